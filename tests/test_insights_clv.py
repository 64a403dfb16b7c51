"""Customer lifetime value on the public CDNOW data: the published parameters, reproduced.

Fader, Hardie and Lee (2005) fit BG/NBD on weeks 1-39 of the 2,357-customer sample:
r = 0.243, alpha = 4.414, a = 0.793, b = 2.426 (log-likelihood -9582.4); and Gamma-Gamma on the
same customers' spend: p = 6.25, q = 3.74, gamma = 15.44.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kilde.insights.clv import (
    PUBLISHED_BGNBD,
    PUBLISHED_GAMMA_GAMMA,
    InsufficientDataError,
    cdnow_validation,
    fit_bgnbd,
    fit_gamma_gamma,
)
from tests.conftest import run_kilde

CDNOW = Path(__file__).resolve().parents[2] / "shared" / "data" / "cdnow"


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    if not (CDNOW / "CDNOW_sample.txt").exists():
        pytest.fail(f"the CDNOW data is missing at {CDNOW} (shared/ beside the clone)")
    return cdnow_validation(CDNOW)


def test_bgnbd_reproduces_the_published_parameters_within_one_percent(
    report: dict[str, object],
) -> None:
    assert report["customers"] == 2357
    fitted = report["bgnbd"]
    assert isinstance(fitted, dict)
    for name, published in PUBLISHED_BGNBD.items():
        assert fitted[name]["fitted"] == pytest.approx(published, rel=0.01), name
    assert report["log_likelihood"] == pytest.approx(-9582.4, abs=1.0)


def test_gamma_gamma_reproduces_the_published_parameters_within_one_percent(
    report: dict[str, object],
) -> None:
    fitted = report["gamma_gamma"]
    assert isinstance(fitted, dict)
    for name, published in PUBLISHED_GAMMA_GAMMA.items():
        assert fitted[name]["fitted"] == pytest.approx(published, rel=0.01), name


def test_holdout_forecast_is_reported_against_actual_repeat_purchases(
    report: dict[str, object],
) -> None:
    forecast, actual = report["holdout_forecast"], report["holdout_actual"]
    assert isinstance(forecast, float) and isinstance(actual, int)
    assert actual > 1000
    # the model's known behaviour on CDNOW: close, somewhat under the actual count
    assert 0.8 < forecast / actual < 1.05
    rows = report["by_frequency"]
    assert isinstance(rows, list) and len(rows) == 8
    expected = [r["expected_per_customer"] for r in rows]
    assert expected == sorted(expected)  # more past purchases, more future ones


def test_too_little_data_is_refused_with_a_reason() -> None:
    x = np.array([0, 1, 0, 2, 0], dtype=float)
    t_x = np.array([0, 3, 0, 5, 0], dtype=float)
    T = np.array([10, 10, 9, 8, 7], dtype=float)
    with pytest.raises(InsufficientDataError) as caught:
        fit_bgnbd(x, t_x, T)
    assert "too little purchase history" in caught.value.message
    assert caught.value.fix
    with pytest.raises(InsufficientDataError):
        fit_gamma_gamma(np.array([1.0, 2.0]), np.array([10.0, 12.0]))


def test_customers_who_all_buy_alike_still_get_finite_values() -> None:
    rng = np.random.default_rng(3)
    n = 400
    T = rng.uniform(20, 52, n)
    x = rng.poisson(0.1 * T).astype(float)  # one shared rate, nobody leaves
    t_x = np.where(x > 0, T * rng.uniform(0.5, 1.0, n), 0.0)
    fit = fit_bgnbd(x, t_x, T)
    assert fit.a < 0.05 or fit.regularised  # nobody leaves: the dropout goes to zero
    expected = fit.expected_purchases(52, x, t_x, T)
    assert np.all(np.isfinite(expected))
    assert np.mean(expected) == pytest.approx(0.1 * 52, rel=0.35)


def test_cli_validates_on_cdnow(tmp_path: Path) -> None:
    result = run_kilde("insights", "clv", "--cdnow", str(CDNOW), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["bgnbd"]["r"]["published"] == 0.243
    assert abs(found["bgnbd"]["alpha"]["difference_percent"]) < 1
    table = run_kilde("insights", "clv", "--cdnow", str(CDNOW), cwd=tmp_path)
    assert "log-likelihood -9582.4" in table.stdout and "holdout" in table.stdout
