"""Regenerate BENCHMARKS.md's measured tables from the JSON the benchmark scripts wrote.

Every table in BENCHMARKS.md that a script measures sits between two markers,
``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; this script replaces what is between them
with the table rendered from ``benchmarks/results/`` (and the demo's ``metrics.json``), headed by
the command, the commit and the machine the JSON records. Nothing between the markers is
written by hand, so a table always shows what its JSON holds.

Usage::

    python benchmarks/report.py                 # rewrite BENCHMARKS.md in place
    python benchmarks/report.py --check         # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _head(data: dict[str, Any]) -> str:
    machine = data.get("machine", {})
    return (
        f"`{data.get('command', '?')}` at commit `{data.get('commit', 'not recorded')}`, "
        f"on {machine.get('cpu', '?')} (torch threads: {machine.get('torch_threads', '?')})."
    )


def meta_step() -> str:
    data = _load("meta_step.json")
    if data is None:
        return "_No `benchmarks/results/meta_step.json` yet._"
    rate = data["meta_steps_per_second"]
    ratio = data.get("ratios", {})
    labels = {
        "hierbayes_fit": "`hierbayes.inference.fit` (the fast road)",
        "bare_batched": "bare batched torch (`baddbmm`, one autograd call a step)",
        "per_task_loop": "per-task loop (`functional_call` per task)",
        "hierbayes_svi": "`pyro.infer.SVI(model, guide, Adam, loss=MAMLObjective())` (the Pyro road)",
        "hierbayes_svi_unvalidated": "the same SVI with `pyro.enable_validation(False)`",
    }
    rows = [f"| {labels.get(k, k)} | {v:,.0f} |" for k, v in rate.items()]
    lines = [_head(data), "", "| implementation | meta-steps/s (median of rounds) |", "|---|---|"]
    lines += rows
    if ratio:
        lines += ["", "| ratio | value | target |", "|---|---|---|"]
        targets = {
            "hierbayes_fit_over_per_task_loop": "≥ 6",
            "bare_batched_over_hierbayes_fit": "≤ 1.15",
            "bare_batched_over_hierbayes_svi": "≤ 1.5",
            "bare_batched_over_hierbayes_svi_unvalidated": "≤ 1.5",
        }
        lines += [f"| {k} | {v:.3f} | {targets.get(k, '')} |" for k, v in ratio.items()]
    return "\n".join(lines)


def llama() -> str:
    data = _load("llama.json")
    if data is None:
        return "_No `benchmarks/results/llama.json` yet._"
    lines = [
        _head(data),
        "",
        "| objective-curvature | ms / step | × MAML | peak RSS MB | +RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name, row in data["results"].items():
        lines.append(
            f"| {name} | {row['ms_per_step']:,.2f} | {row['ratio_to_maml']:,.2f} | "
            f"{row['peak_rss_mb']:,.0f} | {row['rss_increase_mb']:,.0f} |"
        )
    return "\n".join(lines)


def _ms(entry: dict[str, float], digits: int = 3) -> str:
    return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"


def _holds(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return "–"
    verdict = (
        "better" if paired["all_seeds_better"] else "worse" if paired["all_seeds_worse"] else "no"
    )
    return f"{_ms(paired['over_seeds'])} ({verdict})"


def seeds(name: str) -> Callable[[], str]:
    def render() -> str:
        data = _load(name)
        if data is None:
            return f"_No `benchmarks/results/{name}` yet._"
        lines = [
            _head(data),
            "Mean ± sd over the training seeds. ΔNLL columns: the paired per-task NLL difference "
            "to MAML with a learned noise scale (summed-log-likelihood step; and MSE step), "
            "averaged over seeds ± sd over seeds; *(better)*/*(worse)* when every seed's 95% "
            "interval over the 600 tasks excludes 0 in that direction, *(no)* otherwise.",
            "",
            "| configuration | NLL / point | MSE | cover 50% | cover 90% | 90% low / mid / high "
            "| ΔNLL vs MAML+noise | ΔNLL vs MAML+noise (MSE step) | σ̂ | s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, e in data["summary"].items():
            terc = e["coverage_90_by_tercile"]
            noise = [v for v in e["noise_scale"] if v is not None]
            sigma = "/".join(f"{v:.2f}" for v in noise) if noise else "1 (fixed)"
            prior = "/".join(f"{v:.3g}" for v in e["prior_scale"])
            lines.append(
                f"| {key} | {_ms(e['nll'])} | {_ms(e['mse'])} | {_ms(e['coverage_50'], 2)} | "
                f"{_ms(e['coverage_90'], 2)} | {terc['low']['mean']:.2f} / "
                f"{terc['mid']['mean']:.2f} / {terc['high']['mean']:.2f} | "
                f"{_holds(e.get('paired_nll_vs_reference'))} | "
                f"{_holds(e.get('paired_nll_vs_second_reference'))} | {sigma} | {prior} |"
            )
        if data.get("errors"):
            lines += ["", f"{len(data['errors'])} run(s) failed; see the JSON's `errors`."]
        return "\n".join(lines)

    return render


def demo() -> str:
    folder = RESULTS / "demo"
    path = folder / "metrics.json"
    if not path.is_file():
        return "_No `benchmarks/results/demo/metrics.json` yet (`make bench-demo`)._"
    from hierbayes.experiments.sinusoid import format_report

    reports = list(json.loads(path.read_text()).values())
    commit = (folder / "COMMIT").read_text().strip() if (folder / "COMMIT").is_file() else "?"
    return "\n".join(
        [
            f"`make bench-demo` (`python -m hierbayes demo`, seed {reports[0].get('seed', 0)}) "
            f"at commit `{commit}`; the table is the demo's own printed report:",
            "",
            "```",
            format_report(reports),
            "```",
        ]
    )


def prior_scale() -> str:
    data = _load("prior_scale.json")
    if data is None:
        return "_No `benchmarks/results/prior_scale.json` yet._"
    lines = [
        _head(data),
        "",
        "| inner step, learned s | s at steps 0 / 2k / 4k / 6k / 8k / end | σ̂ at the same steps | "
        "effective MSE step at the end |",
        "|---|---|---|---|",
    ]
    for run in data["runs"]:
        trace = run["trace"][::4]
        s_path = " / ".join(f"{t['prior_scale']:.3g}" for t in trace)
        sigma = " / ".join(f"{t['noise_scale']:.2f}" for t in trace)
        lines.append(
            f"| {run['config']} | {s_path} | {sigma} | {run['trace'][-1]['mse_step']:.4f} |"
        )
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "prior_scale": prior_scale,
    "meta_step": meta_step,
    "llama": llama,
    "seeds_5shot": seeds("seeds_5shot.json"),
    "seeds_10shot": seeds("seeds_10shot.json"),
    "demo": demo,
}


def render(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            return match.group(0)
        return f"<!-- table:{name} -->\n{TABLES[name]()}\n<!-- /table:{name} -->"

    return re.sub(r"<!-- table:(\w+) -->.*?<!-- /table:\1 -->", replace, text, flags=re.DOTALL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = args.file.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.file} is out of date: run python benchmarks/report.py")
            sys.exit(1)
        return
    args.file.write_text(new)
    print(f"rewrote {args.file}")


if __name__ == "__main__":
    main()
