r"""What :func:`~hierbayes.inference.diagnostics.compare.compare_approximations` returns: a table
of plain values per approximation, per-task values, the ArviZ data and the figures.

:meth:`ComparisonResult.to_dict` is what ``metrics.json`` holds (NaN and infinities become
``null``); :meth:`ComparisonResult.format` a printable table; :meth:`ComparisonResult.save_figures`
draws ArviZ's forest and posterior plots through the bridge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ComparisonResult"]


@dataclass
class ComparisonResult:
    r"""What :func:`~hierbayes.inference.diagnostics.compare.compare_approximations` returns.

    Attributes
    ----------
    table:
        One row per approximation (in the order given): plain floats, ints, lists and
        ``None``; see
        :func:`~hierbayes.inference.diagnostics.compare.compare_approximations` for the columns.
    per_task:
        Per approximation, per-task values: ``lpd``, ``coverage_50``, ``coverage_90``,
        ``mean_error_sd`` (root mean square over parameters), ``w2``.
    reference:
        The reference's name, or ``None``.
    reference_flagged:
        Tasks (indices) on which the reference's :math:`\hat R` exceeds its threshold.
    inference_data:
        Per approximation, its ``arviz.InferenceData`` on the held-out tasks.
    figures:
        Per approximation, ``{"forest": path, "posterior": path}`` once :meth:`save_figures`
        has run.
    settings:
        Draws, chains, levels and seed of the comparison.
    """

    table: dict[str, dict[str, Any]]
    per_task: dict[str, dict[str, list[float | None]]]
    reference: str | None
    reference_flagged: list[int]
    inference_data: dict[str, Any]
    settings: dict[str, Any]
    figures: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``metrics.json``: NaN and infinities become ``None``."""
        approximations: dict[str, Any] = {}
        for name, row in self.table.items():
            entry = dict(row)
            entry["per_task"] = self.per_task.get(name, {})
            if name in self.figures:
                entry["figures"] = dict(self.figures[name])
            approximations[name] = entry
        return _plain(
            {
                "reference": self.reference,
                "reference_flagged": list(self.reference_flagged),
                "settings": dict(self.settings),
                "approximations": approximations,
            }
        )

    def format(self) -> str:
        """A printable table, one line per approximation."""
        header = (
            f"{'approximation':22s} {'lpd/pt':>8s} {'ELPD ± se':>17s} {'Δ ± dse':>15s} "
            f"{'cov50':>6s} {'cov90':>6s} {'μ err/sd':>9s} {'W2':>8s} {'R-hat':>7s} {'time s':>8s}"
        )
        lines = [header, "-" * len(header)]
        for name, row in self.table.items():
            mark = " (ref)" if row.get("is_reference") else ""
            rhat = row.get("rhat_max")
            lines.append(
                f"{(name + mark)[:22]:22s} {_num(row['lpd'], 8, 3)} "
                f"{_pm(row['elpd'], row['elpd_se'], 17)} "
                f"{_pm(row['elpd_diff'], row['elpd_dse'], 15)} "
                f"{_num(row.get('coverage_50'), 6, 2)} {_num(row.get('coverage_90'), 6, 2)} "
                f"{_num(row.get('mean_error_sd'), 9, 3)} {_num(row.get('w2'), 8, 3)} "
                f"{_num(rhat, 7, 3)} {_num(row.get('wall_time'), 8, 2)}"
            )
        if self.reference is None:
            lines.append("no reference: distance columns are empty")
        else:
            lines.append(f"reference: {self.reference}")
        if self.reference_flagged:
            lines.append(
                f"WARNING: the reference {self.reference!r} has R-hat above "
                f"{self.settings.get('rhat_threshold', 1.01)} on task(s) {self.reference_flagged}; "
                "its distances are not trustworthy there"
            )
        return "\n".join(lines)

    def save_figures(
        self,
        folder: str | Path,
        *,
        prefix: str = "",
        task: int | None = None,
        parameters: Sequence[str] | None = None,
    ) -> dict[str, dict[str, str]]:
        """Save ``az.plot_forest`` (all approximations, one task) and one ``az.plot_posterior``
        per approximation as PNG files in ``folder``; return and remember their paths."""
        from hierbayes.inference.diagnostics.arviz_bridge import plot_forest, plot_posterior

        out = Path(folder)
        forest = plot_forest(
            self.inference_data,
            out / f"{prefix}forest.png",
            task=task,
            parameters=parameters,
            title=f"{prefix.rstrip('_')} posterior intervals (90% HDI)".strip(),
        )
        reference = self.inference_data.get(self.reference) if self.reference else None
        for name, idata in self.inference_data.items():
            posterior = plot_posterior(
                idata,
                out / f"{prefix}posterior_{name}.png",
                task=task,
                parameters=parameters,
                reference=reference if name != self.reference else None,
                reference_name=self.reference or "reference",
            )
            self.figures[name] = {"forest": str(forest), "posterior": str(posterior)}
        return self.figures


def _num(value: Any, width: int, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}s}"
    return f"{value:>{width}.{digits}f}"


def _pm(value: Any, se: Any, width: int) -> str:
    if value is None or not math.isfinite(float(value)):
        return f"{'-':>{width}s}"
    return f"{f'{value:.2f} ± {se:.2f}':>{width}s}"


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dicts, lists, finite floats, ints, strings, ``None``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    try:
        return _plain(float(value))
    except (TypeError, ValueError):
        return str(value)
