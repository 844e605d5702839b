"""Short Omniglot runs that chose the CPU configuration's recipe (BENCHMARKS §11, "recipe").

Each run meta-trains first-order MAML for ``--steps`` steps (1 inner step of 0.4 on the mean
NLL, meta-batch 16 for 5-way and 8 for 20-way, ±2-pixel shifts) and reports accuracy and NLL on
200 of the fixed held-out test episodes and on 200 training-class episodes, after 1, 3 and 10
inner steps. Variants, as measured (one training seed each; a 200-episode accuracy has a 95 %
interval of about ±1.5 points at 5-way):

* ``--learn-step-size per_parameter``: Meta-SGD's learned per-weight step sizes;
* ``--pretrain N``: theta's convolutions start at a network trained by cross-entropy on all
  544 classes for N minibatches of 64 (``--cosine``: cosine-decayed learning rate);
* ``--zero-head``: the output layer's theta held at zero (the label-permutation-symmetric prior
  mean), by resetting it after every step;
* ``--flips``: each class mirrored left-right as one more class; ``--affine DEG SCALE SHIFT``:
  random rotations, scalings and shifts of every training image.

Usage::

    python benchmarks/bench_omniglot_recipe.py NAME --ways 5 --steps 2000 [options]

writes ``benchmarks/results/omniglot/recipe/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hierbayes.experiments.omniglot.config import ShiftedEpisodes, config_for, test_episodes
from hierbayes.experiments.omniglot.evaluation import evaluate_probs
from hierbayes.inference import FitResult, fit
from hierbayes.models import ConvClassifier, conv4_network
from hierbayes.tasks import ImageDataset, TaskBatch, load_omniglot

OUT = Path(__file__).parent / "results" / "omniglot" / "recipe"


class AffineEpisodes:
    """Episodes with every image rotated by up to ``deg`` degrees, scaled by up to ``1 ± scale``
    and shifted by up to ``shift`` pixels (bilinear, zero fill)."""

    num_tasks = None

    def __init__(self, inner: Any, deg: float, scale: float, shift: float) -> None:
        self.inner, self.deg, self.scale, self.shift = inner, deg, scale, shift

    def warp(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        flat = x.reshape(-1, *x.shape[-3:])
        n = flat.shape[0]
        a = (torch.rand(n, generator=g) * 2 - 1) * self.deg * math.pi / 180
        k = 1 + (torch.rand(n, generator=g) * 2 - 1) * self.scale
        t = (torch.rand(n, 2, generator=g) * 2 - 1) * self.shift * 2 / flat.shape[-1]
        A = torch.zeros(n, 2, 3)
        A[:, 0, 0], A[:, 0, 1] = torch.cos(a) / k, -torch.sin(a) / k
        A[:, 1, 0], A[:, 1, 1] = torch.sin(a) / k, torch.cos(a) / k
        A[:, :, 2] = t
        grid = F.affine_grid(A, list(flat.shape), align_corners=False)
        return F.grid_sample(flat, grid, align_corners=False).reshape(x.shape)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, dtype: Any = None
    ) -> TaskBatch:
        b = self.inner.sample(n, generator=generator, dtype=dtype)
        qx = self.warp(b.query_x, generator)
        sx = self.warp(b.support_x, generator)
        return TaskBatch(sx, b.support_y, qx, b.query_y, info=b.info, validate=False)


def pretrained_convolutions(train: ImageDataset, steps: int, cosine: bool) -> Tensor:
    g = torch.Generator().manual_seed(0)
    net = conv4_network(train.num_classes).float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    shifter = ShiftedEpisodes(train.episodes(ways=2, shots=1, query_shots=0), 2)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = F.cross_entropy(net(shifter.shift(train.images[idx], g)), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return torch.cat([p.detach().reshape(-1) for p in list(net.parameters())[:-2]])


def score(result: FitResult, batch: TaskBatch, steps: int) -> tuple[float, float]:
    probs = []
    for a in range(0, batch.num_tasks, 50):
        s = slice(a, a + 50)
        qx, qy = batch.query_x[s], batch.query_y[s]  # type: ignore[index]
        sub = TaskBatch(batch.support_x[s], batch.support_y[s], qx, qy, validate=False)
        post = result.adapt(sub, inner_steps=steps)
        with torch.no_grad():
            probs.append(post.predict(qx).mean.double())
    m = evaluate_probs(torch.cat(probs), batch.query_y.long())  # type: ignore[union-attr]
    return round(m["accuracy"]["mean"], 4), round(m["nll"]["mean"], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--learn-step-size", default="fixed")
    p.add_argument("--pretrain", type=int, default=0)
    p.add_argument("--cosine", action="store_true")
    p.add_argument("--zero-head", action="store_true")
    p.add_argument("--flips", action="store_true")
    p.add_argument("--affine", type=float, nargs=3, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    ways = args.ways
    cfg = config_for("cpu", ways, 1, "maml", eval_episodes=200)
    train = load_omniglot(cfg.train_source, rotations=True)
    if args.flips:
        K = train.num_classes
        train = ImageDataset(
            torch.cat([train.images, train.images.flip(-1)]),
            torch.cat([train.labels, train.labels + K]),
            train.class_names + tuple(n + "/flip" for n in train.class_names),
        )
    episodes = train.episodes(ways=ways, shots=1, query_shots=2)
    source: Any = ShiftedEpisodes(episodes, 2)
    if args.affine is not None:
        source = AffineEpisodes(ShiftedEpisodes(episodes, 0), *args.affine)
    model = ConvClassifier(ways)
    head = 257 * ways
    if args.zero_head:
        with torch.no_grad():
            model.theta_init[-head:] = 0
    t0 = time.perf_counter()
    if args.pretrain:
        body = pretrained_convolutions(train, args.pretrain, args.cosine)
        with torch.no_grad():
            model.theta_init[: body.numel()] = body

    def zero_head(step: int, loss: float, result: FitResult) -> None:
        theta = result.guide.global_values()["theta"].detach().clone()
        theta[-head:] = 0
        result.guide.set_global_values({"theta": theta})

    result = fit(
        model,
        source,
        method="maml",
        meta_steps=args.steps,
        meta_batch_size=16 if ways == 5 else 8,
        step_size=0.4,
        learn_step_size=args.learn_step_size,
        inner_loss="mean",
        first_order=True,
        dtype=torch.float32,
        progress=False,
        check_every=args.steps,
        seed=0,
        callback=zero_head if args.zero_head else None,
    )
    out: dict[str, Any] = {"name": args.name, "args": vars(args)}
    out["train_s"] = time.perf_counter() - t0
    test = test_episodes(cfg, load_omniglot(cfg.test_source, alphabets=cfg.test_alphabets))
    own = train.episodes(ways=ways, shots=1, query_shots=5)
    seen = own.sample(200, generator=torch.Generator().manual_seed(5))
    for label, batch in (("test", test), ("train", seen)):
        for k in (1, 3, 10):
            out[f"{label}_k{k}"] = score(result, batch, k)
    print(json.dumps(out))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
