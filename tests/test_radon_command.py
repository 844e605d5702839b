"""``python -m hierbayes radon``: the schema of metrics.json, the data file's county order, the
forest plot, and empirical-Bayes numbers equal to the library's own (``fit`` + ``adapt``)."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import torch

from hierbayes.__main__ import main
from hierbayes.experiments.radon import RadonConfig, mixture_quantiles
from hierbayes.inference import fit
from hierbayes.models import ContextualEffects
from hierbayes.tasks import radon_tasks

METHODS = ("empirical_bayes", "hyper_laplace", "nuts")
FIELDS = {"mean", "sd", "q05", "q95"}
Z95 = 1.6448536269514722


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """One quick run of the command (about 20 s), shared by the tests of this file."""
    out = tmp_path_factory.mktemp("radon")
    printed = io.StringIO()
    with redirect_stdout(printed):
        main(
            [
                "radon",
                "--quick",
                "--hyper-nodes",
                "150",
                "--target-accept",
                "0.85",
                "--seed",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    return out, json.loads((out / "metrics.json").read_text()), printed.getvalue()


def _data_file() -> dict[str, Any]:
    text = (
        files("hierbayes.data") / "posteriordb" / "radon_mn_contextual_derived.json"
    ).read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def test_metrics_have_the_promised_schema(run: tuple[Path, dict[str, Any], str]) -> None:
    _, metrics, _ = run
    assert set(metrics) == {
        "county_effect",
        "hyper",
        "counties",
        "against_nuts",
        "diagnostics",
        "settings",
        "figures",
        "timings",
    }
    hyper = metrics["hyper"]
    assert hyper["sites"] == {
        "county_effect_mean": "mu",
        "county_effect_scale": "tau",
        "weights": "w",
        "noise_scale": "sigma",
    }
    names = set(hyper["sites"])
    assert set(hyper["empirical_bayes"]) == names
    assert len(hyper["empirical_bayes"]["weights"]) == 3
    for method in ("hyper_laplace", "nuts"):
        assert set(hyper[method]) == names
        for key, value in hyper[method].items():
            assert set(value) == {"mean", "sd"}
            sds = value["sd"] if key == "weights" else [value["sd"]]
            means = value["mean"] if key == "weights" else [value["mean"]]
            assert len(sds) == len(means) == (3 if key == "weights" else 1)
            assert all(math.isfinite(m) for m in means)
            assert all(math.isfinite(s) and s > 0 for s in sds), (method, key)
    assert set(metrics["timings"]) == {*METHODS, "total"}
    assert all(v > 0 for v in metrics["timings"].values())
    assert metrics["timings"]["total"] >= sum(metrics["timings"][m] for m in METHODS)
    nuts = metrics["diagnostics"]["nuts"]
    assert {"rhat_max", "ess_bulk_min", "divergences", "converged"} <= set(nuts)
    assert nuts["rhat_max"] >= 1.0 - 1e-6 and nuts["ess_bulk_min"] > 0
    assert isinstance(nuts["divergences"], int) and nuts["divergences"] >= 0
    # R-hat max and ESS min run over every latent: the 85 intercepts and the globals
    per_site = nuts["hyperparameters"].values()
    rhats = [
        r for d in per_site for r in (d["rhat"] if isinstance(d["rhat"], list) else [d["rhat"]])
    ]
    esses = [
        e
        for d in per_site
        for e in (d["ess_bulk"] if isinstance(d["ess_bulk"], list) else [d["ess_bulk"]])
    ]
    assert nuts["rhat_max"] == pytest.approx(max(max(rhats), nuts["rhat_max"]), rel=1e-12)
    assert nuts["ess_bulk_min"] == pytest.approx(
        min(*esses, nuts["ess_bulk_min_counties"]), rel=1e-12
    )
    assert nuts["draws"] == 2 * 30  # --quick: 2 chains x 30 draws
    assert metrics["diagnostics"]["empirical_bayes"]["converged"] is True
    # the options reach the methods
    assert metrics["settings"]["hyper_nodes"] == 150
    assert metrics["diagnostics"]["hyper_laplace"]["nodes"] == 150
    assert nuts["settings"]["target_accept_prob"] == 0.85
    assert (nuts["settings"]["num_warmup"], nuts["settings"]["num_chains"]) == (30, 2)


def test_counties_follow_the_data_files_order(run: tuple[Path, dict[str, Any], str]) -> None:
    _, metrics, _ = run
    data = _data_file()
    counties = metrics["counties"]
    assert len(counties) == data["J"] == 85
    assert [c["county"] for c in counties] == sorted(set(data["county_idx"]))
    houses = torch.bincount(torch.tensor(data["county_idx"]), minlength=86)[1:]
    assert [c["houses"] for c in counties] == houses.tolist()
    for c in counties:
        assert set(c) == {"county", "houses", *METHODS}
        for method in METHODS:
            s = c[method]
            assert set(s) == FIELDS
            assert all(math.isfinite(s[k]) for k in FIELDS), (c["county"], method)
            assert s["sd"] > 0 and s["q05"] < s["mean"] < s["q95"], (c["county"], method, s)


def test_against_nuts_is_computed_from_the_county_table(
    run: tuple[Path, dict[str, Any], str],
) -> None:
    _, metrics, _ = run
    counties = metrics["counties"]
    ref_mean = torch.tensor([c["nuts"]["mean"] for c in counties])
    ref_sd = torch.tensor([c["nuts"]["sd"] for c in counties])
    for method in ("empirical_bayes", "hyper_laplace"):
        mean = torch.tensor([c[method]["mean"] for c in counties])
        sd = torch.tensor([c[method]["sd"] for c in counties])
        row = metrics["against_nuts"][method]
        assert row["mean_abs_mean_difference"] == pytest.approx(
            float((mean - ref_mean).abs().mean()), rel=1e-12
        )
        assert row["mean_sd_ratio"] == pytest.approx(float((sd / ref_sd).mean()), rel=1e-12)


def test_empirical_bayes_equals_fit_and_adapt(run: tuple[Path, dict[str, Any], str]) -> None:
    """The command's EB numbers are the library's: fit(ContextualEffects(), radon_tasks(),
    method="llama", objective="evidence") and adapt, Gaussian 5 % and 95 % quantiles."""
    _, metrics, _ = run
    tasks = radon_tasks()
    result = fit(
        ContextualEffects(), tasks, method="llama", objective="evidence", seed=0, progress=False
    )
    posterior = result.adapt(tasks.batch())
    mean, sd = posterior.mean[:, 0], posterior.sd[:, 0]
    table = metrics["counties"]
    got = {k: torch.tensor([c["empirical_bayes"][k] for c in table]) for k in FIELDS}
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["mean"], mean, **tol)
    torch.testing.assert_close(got["sd"], sd, **tol)
    torch.testing.assert_close(got["q05"], mean - Z95 * sd, **tol)
    torch.testing.assert_close(got["q95"], mean + Z95 * sd, **tol)
    hyper = metrics["hyper"]["empirical_bayes"]
    for key, site in metrics["hyper"]["sites"].items():
        expected = result.params[site].reshape(-1)
        torch.testing.assert_close(torch.tensor(hyper[key]).reshape(-1), expected, **tol)


def test_hyper_laplace_hyperparameters_lie_around_the_fit(
    run: tuple[Path, dict[str, Any], str],
) -> None:
    """μ and w are near-Gaussian in the globals' posterior: its mean lies within two of its sds
    of the type-II MAP (the modes differ only through the skewed scales)."""
    _, metrics, _ = run
    eb, hl = metrics["hyper"]["empirical_bayes"], metrics["hyper"]["hyper_laplace"]
    for key in ("county_effect_mean", "weights"):
        point = torch.tensor(eb[key]).reshape(-1)
        mean = torch.tensor(hl[key]["mean"]).reshape(-1)
        sd = torch.tensor(hl[key]["sd"]).reshape(-1)
        assert bool(((mean - point).abs() < 2 * sd).all()), (key, mean, point, sd)


def test_forest_plot_and_report(run: tuple[Path, dict[str, Any], str]) -> None:
    out, metrics, printed = run
    figure = out / "forest.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 20_000
    assert metrics["figures"] == {"forest": str(figure)}
    assert "county_effect_scale (tau)" in printed
    assert "mean |Δmean|" in printed and "mean sd ratio" in printed
    assert "hyper laplace" in printed.split("seconds:")[1]


def test_mixture_quantiles_invert_the_mixture_cdf() -> None:
    """One component: the Gaussian's own quantiles; a bimodal mixture: F(q) = p to rounding."""
    probabilities = (0.05, 0.5, 0.95)
    mean, sd = torch.tensor([[0.3, -2.0]]), torch.tensor([[0.5, 3.0]])
    single = mixture_quantiles(torch.ones(1), mean, sd, probabilities)
    z = torch.special.ndtri(torch.tensor(probabilities))[:, None]
    torch.testing.assert_close(single, mean + z * sd, rtol=0, atol=1e-12)
    weights = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([[-3.0], [0.0], [4.0]])
    sds = torch.tensor([[0.5], [1.0], [0.2]])
    q = mixture_quantiles(weights, means, sds, probabilities)
    cdf = (
        weights[:, None, None] * torch.special.ndtr((q[None] - means[:, None]) / sds[:, None])
    ).sum(0)
    torch.testing.assert_close(cdf, torch.tensor(probabilities)[:, None], rtol=0, atol=1e-12)


def test_settings_are_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match="num_chains"):
        RadonConfig(num_chains=0)
    with pytest.raises(ValueError, match="hyper_nodes"):
        RadonConfig.quick(hyper_nodes=1)
    with pytest.raises(ValueError, match="target_accept_prob"):
        RadonConfig(target_accept_prob=1.0)
    with pytest.raises(ValueError, match="2 draws"):
        RadonConfig(num_samples=1, num_chains=1)
