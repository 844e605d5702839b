"""Tabulate Omniglot runs over training seeds (BENCHMARKS §11).

Reads ``metrics.json`` of the runs named ``<prefix>-<ways>way-<method>-s<seed>`` under a folder
and prints, per (ways, method), each seed's accuracy / NLL / ECE and their mean ± sd over seeds,
and the paired LLAMA − MAML differences of the seeds that have both.

    python benchmarks/summarize_omniglot.py benchmarks/results/omniglot --prefix v2
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any


def _runs(root: Path, prefix: str) -> dict[tuple[int, str], dict[int, dict[str, Any]]]:
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)way-(maml|llama)-s(\d+)$")
    found: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
    for path in sorted(root.glob(f"{prefix}-*/metrics.json")):
        m = pattern.match(path.parent.name)
        if m:
            ways, method, seed = int(m[1]), m[2], int(m[3])
            found.setdefault((ways, method), {})[seed] = json.loads(path.read_text())
    return found


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--prefix", default="v2")
    args = p.parse_args()
    runs = _runs(args.root, args.prefix)
    print("| run | seeds | accuracy % (each seed) | mean ± sd over seeds | NLL | ECE | minutes |")
    print("|---|---|---|---|---|---|---|")
    for (ways, method), by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        acc = [by_seed[s]["accuracy"]["mean"] for s in seeds]
        nll = [by_seed[s]["nll"]["mean"] for s in seeds]
        ece = [by_seed[s]["ece"] for s in seeds]
        minutes = [by_seed[s]["wall_seconds"] / 60 for s in seeds]
        each = ", ".join(
            f"{100 * a:.2f} ± {100 * by_seed[s]['accuracy']['ci95']:.2f}"
            for s, a in zip(seeds, acc, strict=True)
        )
        print(
            f"| {ways}-way {method} | {seeds} | {each} | {_spread(acc, 100)} | "
            f"{_spread(nll, digits=3)} | {_spread(ece, digits=3)} | "
            f"{min(minutes):.1f}–{max(minutes):.1f} |"
        )
    for (ways, method), by_seed in sorted(runs.items()):
        seeds = [s for s in sorted(by_seed) if "pretrain_finetune" in by_seed[s]["baselines"]]
        if method != "maml" or not seeds:
            continue
        base = [by_seed[s]["baselines"]["pretrain_finetune"] for s in seeds]
        acc = [b["accuracy"]["mean"] for b in base]
        each = ", ".join(f"{100 * a:.2f}" for a in acc)
        print(
            f"| {ways}-way pretrain + fine-tune | {seeds} | {each} | {_spread(acc, 100)} | "
            f"{_spread([b['nll']['mean'] for b in base], digits=3)} | "
            f"{_spread([b['ece'] for b in base], digits=3)} | (in the MAML runs) |"
        )
    for ways in sorted({w for w, _ in runs}):
        maml, llama = runs.get((ways, "maml"), {}), runs.get((ways, "llama"), {})
        both = sorted(set(maml) & set(llama))
        if not both:
            continue
        rows = []
        for key, scale in (("accuracy", 100.0), ("nll", 1.0)):
            d = [llama[s][key]["mean"] - maml[s][key]["mean"] for s in both]
            rows.append(f"{key} {_spread(d, scale, 3)}")
        d_ece = [llama[s]["ece"] - maml[s]["ece"] for s in both]
        rows.append(f"ECE {_spread(d_ece, digits=4)}")
        print(f"\n{ways}-way, LLAMA − MAML paired over seeds {both}: " + "; ".join(rows))
        for s in both:
            print(f"  seed {s}: prior scale chosen {llama[s].get('llama', {}).get('prior_scale')}")


if __name__ == "__main__":
    main()
