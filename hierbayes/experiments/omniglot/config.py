"""Settings of the Omniglot experiment, its test episodes and the training augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hierbayes.tasks import EpisodicSampler, ImageDataset, TaskBatch, load_omniglot

__all__ = [
    "EVAL_SEED",
    "TEST_ALPHABETS",
    "OmniglotConfig",
    "ShiftedEpisodes",
    "config_for",
    "test_episodes",
]

#: The alphabets of small2 that small1 lacks: the held-out test alphabets.
TEST_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
#: Seed of the test episodes: every method and run sees the same ones.
EVAL_SEED = 20170306


@dataclass
class OmniglotConfig:
    """Settings of one Omniglot run. :func:`config_for` gives the CPU and GPU configurations."""

    ways: int = 5
    shots: int = 1
    method: str = "maml"
    meta_steps: int = 3000
    meta_batch_size: int = 16
    #: query examples per class in training episodes (test episodes use ``eval_query_shots``)
    query_shots: int = 2
    inner_steps: int = 1
    eval_inner_steps: int = 10
    #: the inner step size alpha: its start, and whether meta-training learns one per weight
    #: (``"per_parameter"``, Li et al. 2017's Meta-SGD: a learned diagonal preconditioner, i.e.
    #: a learned diagonal prior covariance; MATH.md §3), one scalar or none (``"fixed"``)
    step_size: float = 0.4
    learn_step_size: str = "per_parameter"
    #: where meta-training starts theta: ``"pretrained"`` (the convolution weights of the
    #: whole-class network of :mod:`~hierbayes.experiments.omniglot.pretrain`) or ``"random"``
    init: str = "pretrained"
    first_order: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_shift: int = 2
    eval_episodes: int = 600
    eval_query_shots: int = 5
    eval_chunk: int = 50
    #: LLAMA: objective, curvature and draws of the sampled Laplace predictive
    objective: str = "paper"
    curvature: str = "fisher_diag"
    curvature_data: str = "support"
    #: LLAMA: the last ``llama_steps`` meta-steps use the paper's loss (see ``_fit``)
    llama_steps: int = 200
    llama_batch_size: int = 4
    #: LLAMA: start from a saved run's theta (a MAML run's ``model.pt``) and take only the
    #: ``llama_steps`` steps of the paper's loss
    warm_start: str | None = None
    #: LLAMA: the prior scale s (None: chosen from ``prior_scale_grid`` on training episodes)
    prior_scale: float | None = None
    prior_scale_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
    prior_scale_episodes: int = 20
    predictive_samples: int = 30
    #: whole-class pretraining (the baseline's network and ``init="pretrained"``'s start)
    pretrain_steps: int = 5000
    pretrain_batch_size: int = 64
    finetune_steps: int = 100
    train_source: str = "images_background_small1"
    test_source: str = "images_background_small2"
    test_alphabets: tuple[str, ...] = TEST_ALPHABETS
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    plot_episodes: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def config_for(name: str, ways: int, shots: int, method: str, **overrides: Any) -> OmniglotConfig:
    """``"cpu"``: fits 30 minutes on 2 cores (first order, 1 inner step, 6,000 / 4,000
    meta-steps from the pretrained network, learned per-weight steps, 10 steps at test);
    ``"gpu"``: the MAML paper's settings (meta-batch 32 for 5-way and 16 for 20-way, 5 inner steps in training and
    10 at test, step 0.4, 60,000 meta-steps, second order, on ``cuda``)."""
    if name == "cpu":
        cfg = OmniglotConfig(
            ways=ways,
            shots=shots,
            method=method,
            # measured with one core each, two runs at once on the 2-core machine (BENCHMARKS
            # §11): 5-way, 5,000 pretraining + 6,000 meta-steps, 18.4 min in all; 20-way, 5,000
            # meta-steps took 31.0 min beside other work, so it takes 4,000 (about 26 min)
            meta_steps=6000 if ways <= 5 else 4000,
            meta_batch_size=16 if ways <= 5 else 8,
            inner_steps=1,
        )
    elif name == "gpu":
        cfg = OmniglotConfig(
            ways=ways,
            shots=shots,
            method=method,
            meta_steps=60_000,
            meta_batch_size=32 if ways <= 5 else 16,
            query_shots=shots,
            inner_steps=5,
            eval_inner_steps=10,
            first_order=False,
            # the paper's MAML: a fixed step from a random initialisation
            learn_step_size="fixed",
            init="random",
            device="cuda",
            eval_chunk=100,
        )
    else:
        raise ValueError(f"unknown configuration {name!r}; known: ['cpu', 'gpu']")
    if method == "llama":  # the Laplace predictive holds N x T x D gradient rows at once
        cfg.eval_chunk = 10
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg


class ShiftedEpisodes:
    """Episodes of an :class:`~hierbayes.tasks.EpisodicSampler` with every image shifted by a
    random whole number of pixels in ``[-max_shift, max_shift]`` along each axis (zero fill)."""

    def __init__(self, sampler: EpisodicSampler, max_shift: int) -> None:
        self.sampler, self.max_shift = sampler, int(max_shift)

    @property
    def num_tasks(self) -> None:
        return None

    def shift(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x`` ``(..., C, H, W)`` with each image shifted independently."""
        m = self.max_shift
        flat = x.reshape(-1, *x.shape[-3:])
        H, W = flat.shape[-2:]
        padded = F.pad(flat, (m, m, m, m))
        offsets = torch.randint(0, 2 * m + 1, (flat.shape[0], 2), generator=generator).tolist()
        out = torch.stack([padded[i, :, a : a + H, b : b + W] for i, (a, b) in enumerate(offsets)])
        return out.reshape(x.shape)

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch:
        batch = self.sampler.sample(num_tasks, generator=generator, dtype=dtype)
        if self.max_shift <= 0:
            return batch
        qx = batch.query_x
        return TaskBatch(
            self.shift(batch.support_x, generator),
            batch.support_y,
            None if qx is None else self.shift(qx, generator),
            batch.query_y,
            info=batch.info,
            validate=False,
        )


def test_episodes(cfg: OmniglotConfig, data: ImageDataset | None = None) -> TaskBatch:
    """The fixed test episodes of ``cfg`` (seed :data:`EVAL_SEED`) from the held-out alphabets."""
    if data is None:
        data = load_omniglot(cfg.test_source, alphabets=cfg.test_alphabets)
    sampler = data.episodes(ways=cfg.ways, shots=cfg.shots, query_shots=cfg.eval_query_shots)
    return sampler.sample(cfg.eval_episodes, generator=torch.Generator().manual_seed(EVAL_SEED))
