"""Customer lifetime value: BG/NBD for how often, Gamma-Gamma for how much.

BG/NBD (Fader, Hardie and Lee 2005, "Counting your customers the easy way") says: while a
customer is active, they buy at their own steady rate (rates differ between people, gamma
distributed with shape r and scale alpha); after each purchase they may drop out for good with
their own probability (beta distributed with a and b). From three numbers per customer, the
repeat purchases x, the time of the last one t_x and the time since the first one T, it gives
the probability that the customer is still active and the purchases to expect in a coming period.

Gamma-Gamma (Fader, Hardie and Lee 2005, "RFM and CLV: using iso-value curves") says: each
customer has their own typical spend per order, around which single orders vary; from the mean
spend of a customer's repeat orders and their number it gives the spend to expect per order,
shrunk towards the population mean when there are few orders.

Both are fitted by maximum likelihood with scipy (parameters on a log scale, so they stay
positive); scipy is imported when a model is first used, since it takes about 40 MB that a
server which never computes lifetime values should not hold.
Time is in weeks throughout. Value = expected purchases x expected spend per order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kilde.errors import KildeError

Array = npt.NDArray[np.float64]

# A fit on fewer customers than this, or on fewer repeat buyers, is refused: the estimates
# would mostly reflect the starting point of the optimiser.
MIN_CUSTOMERS = 30
MIN_REPEATERS = 10
# Fits use at most this many customers (a fixed random sample): the parameters' standard
# errors are already tiny there, and every customer is still scored with them.
FIT_SAMPLE = 50_000
WEEK = 7.0


class InsufficientDataError(KildeError):
    """Too little purchase history for a lifetime-value model to say anything reliable."""


@dataclass(frozen=True)
class BgNbd:
    """A fitted BG/NBD model (time unit: weeks)."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int
    repeaters: int
    iterations: int = 0
    regularised: bool = False

    def params(self) -> dict[str, float]:
        return {"r": self.r, "alpha": self.alpha, "a": self.a, "b": self.b}

    def p_alive(self, x: Array, t_x: Array, T: Array) -> Array:
        """Probability that each customer is still active at the end of their T."""
        x, t_x, T = _arrays(x, t_x, T)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        odds = np.where(
            x > 0,
            a
            / np.maximum(b + x - 1, 1e-12)
            * np.exp((r + x) * np.log((alpha + T) / (alpha + t_x))),
            0.0,
        )
        result: Array = 1.0 / (1.0 + odds)
        return result

    def expected_purchases(self, t: float, x: Array, t_x: Array, T: Array) -> Array:
        """Purchases each customer is expected to make in the next t weeks, given their past."""
        from scipy import special

        x, t_x, T = _arrays(x, t_x, T)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        if abs(a - 1) < 1e-9:  # the formula divides by (a - 1); its limit is continuous
            a = 1.0 + 1e-9
        hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, t / (alpha + T + t))
        first = (a + b + x - 1) / (a - 1)
        second = 1.0 - np.exp((r + x) * np.log((alpha + T) / (alpha + T + t))) * hyp
        odds = np.where(
            x > 0,
            a
            / np.maximum(b + x - 1, 1e-12)
            * np.exp((r + x) * np.log((alpha + T) / (alpha + t_x))),
            0.0,
        )
        result: Array = first * second / (1.0 + odds)
        return result

    def expected_in_period(self, t: Array | float) -> Array:
        """Purchases a new customer is expected to make in their first t weeks (unconditional)."""
        from scipy import special

        t_arr = np.asarray(t, dtype=np.float64)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        hyp = special.hyp2f1(r, b, a + b - 1, t_arr / (alpha + t_arr))
        result: Array = (a + b - 1) / (a - 1) * (1.0 - (alpha / (alpha + t_arr)) ** r * hyp)
        return result


@dataclass(frozen=True)
class GammaGamma:
    """A fitted Gamma-Gamma spend model."""

    p: float
    q: float
    gamma: float
    log_likelihood: float
    customers: int
    iterations: int = 0
    regularised: bool = False

    def params(self) -> dict[str, float]:
        return {"p": self.p, "q": self.q, "gamma": self.gamma}

    def expected_spend(self, x: Array, m: Array) -> Array:
        """Expected spend per order of each customer (population mean for those without repeats)."""
        x = np.asarray(x, dtype=np.float64)
        m = np.asarray(m, dtype=np.float64)
        p, q, v = self.p, self.q, self.gamma
        population = p * v / (q - 1) if q > 1 else float("nan")
        individual = p * (v + x * m) / (p * x + q - 1)
        result: Array = np.where(x > 0, individual, population)
        return result


def _arrays(*values: Any) -> tuple[Array, ...]:
    return tuple(np.asarray(v, dtype=np.float64) for v in values)


# -- the likelihoods ------------------------------------------------------------------------------


def bgnbd_log_likelihood(params: Array, x: Array, t_x: Array, T: Array) -> Array:
    """Per-customer log-likelihood of BG/NBD (Fader, Hardie and Lee 2005, equation 6)."""
    from scipy import special

    r, alpha, a, b = params
    a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
    a2 = special.gammaln(a + b) + special.gammaln(b + x) - special.gammaln(b)
    a2 = a2 - special.gammaln(a + b + x)
    a3 = -(r + x) * np.log(alpha + T)
    with np.errstate(divide="ignore", invalid="ignore"):
        a4 = np.where(
            x > 0,
            np.log(a) - np.log(np.maximum(b + x - 1, 1e-300)) - (r + x) * np.log(alpha + t_x),
            -np.inf,
        )
    result: Array = a1 + a2 + np.logaddexp(a3, a4)
    return result


def gamma_gamma_log_likelihood(params: Array, x: Array, m: Array) -> Array:
    """Per-customer log-likelihood of the Gamma-Gamma model of mean spend m over x orders."""
    from scipy import special

    p, q, v = params
    px = p * x
    result: Array = (
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * np.log(v)
        + (px - 1) * np.log(m)
        + px * np.log(x)
        - (px + q) * np.log(x * m + v)
    )
    return result


def _maximise(negative: Any, start: Array) -> tuple[Array, float, int]:
    """Minimise a negative log-likelihood over log-parameters; return the parameters.

    L-BFGS-B (numerical gradients) converges in few evaluations; when it stops without
    converging, Nelder-Mead, which needs no gradient, carries on from where it stopped.
    """
    from scipy import optimize

    first = optimize.minimize(
        negative, np.log(start), method="L-BFGS-B", options={"ftol": 1e-12, "gtol": 1e-7}
    )
    best, iterations = first, int(first.nit)
    if not first.success:
        polished = optimize.minimize(
            negative,
            first.x,
            method="Nelder-Mead",
            options={"maxiter": 4_000, "xatol": 1e-8, "fatol": 1e-9},
        )
        iterations += int(polished.nit)
        if polished.fun <= first.fun:
            best = polished
    return np.exp(best.x), float(-best.fun), iterations


def _check_data(x: Array, t_x: Array, T: Array) -> None:
    customers = len(x)
    repeaters = int(np.count_nonzero(x > 0))
    if customers < MIN_CUSTOMERS or repeaters < MIN_REPEATERS:
        raise InsufficientDataError(
            f"too little purchase history for a lifetime-value model: {customers} customers, "
            f"{repeaters} of them with a repeat purchase (needs at least {MIN_CUSTOMERS} and "
            f"{MIN_REPEATERS})",
            fix="collect more orders (or import the order history) and try again; until then "
            "RFM scores and the inactivity churn flag still work",
        )
    if np.any(T <= 0) or np.any(t_x > T + 1e-9) or np.any(t_x < 0) or np.any(x < 0):
        raise KildeError(
            "the purchase summary is inconsistent (a last purchase after the end, or T <= 0)",
            fix="summarise the orders with `summarise` before fitting",
        )


def fit_bgnbd(x: Array, t_x: Array, T: Array) -> BgNbd:
    """Fit BG/NBD by maximum likelihood; refuses (InsufficientDataError) too little data.

    When customers are all alike (no spread of purchase rates or of dropout), the maximum lies
    at infinity: r and alpha (or a and b) grow without bound at a fixed ratio. The fit is then
    repeated with a small ridge penalty, which keeps the parameters finite and the predictions
    the same in effect; `regularised` says so. The same happens when nobody ever leaves (a goes
    to zero).
    """
    x, t_x, T = _arrays(x, t_x, T)
    _check_data(x, t_x, T)
    # Fitted in units of the mean T (alpha scales with the unit of time, nothing else does),
    # so that the penalty below means the same whatever the unit.
    scale = float(np.mean(T)) or 1.0
    (xu, t_s, T_s), weights = _compress(x, t_x / scale, T / scale)
    start = np.array([1.0, 1.0, 1.0, 1.0])

    def negative_with(penalty: float) -> Any:
        def negative(log_params: Array) -> float:
            params = np.exp(log_params)
            value = -float(np.dot(weights, bgnbd_log_likelihood(params, xu, t_s, T_s)))
            value += penalty * float(np.sum(log_params**2))
            return value if math.isfinite(value) else 1e300

        return negative

    params, ll, iterations = _maximise(negative_with(0.0), start)
    regularised = False
    if np.any(params > RUNAWAY) or np.any(params < 1 / RUNAWAY):
        params, _, iterations = _maximise(negative_with(RIDGE), start)
        regularised = True
    _check_fit(dict(zip(("r", "alpha", "a", "b"), (float(v) for v in params), strict=True)))
    params[1] *= scale
    ll = float(np.sum(bgnbd_log_likelihood(params, x, t_x, T)))
    r, alpha, a, b = (float(v) for v in params)
    return BgNbd(r, alpha, a, b, ll, len(x), int(np.count_nonzero(x > 0)), iterations, regularised)


RUNAWAY = 1e5


def _compress(*columns: Array) -> tuple[tuple[Array, ...], Array]:
    """Distinct customers' rows and how many customers share each (the likelihood is a sum)."""
    rows, counts = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)
    return tuple(rows[:, i] for i in range(len(columns))), counts.astype(np.float64)


RIDGE = 0.01  # on the log-parameters (scale-free): pulls runaway values back


def fit_gamma_gamma(x: Array, m: Array) -> GammaGamma:
    """Fit Gamma-Gamma on the customers with repeat orders and a positive mean spend."""
    x, m = _arrays(x, m)
    keep = (x > 0) & (m > 0)
    x, m = x[keep], m[keep]
    if len(x) < MIN_REPEATERS:
        raise InsufficientDataError(
            f"too few repeat buyers with a positive spend to model spend per order ({len(x)}, "
            f"needs at least {MIN_REPEATERS})",
            fix="collect more orders; until then the value uses the average order value",
        )

    # Fitted on spend in units of its mean (gamma scales with the currency, p and q do not).
    scale = float(np.mean(m))
    (xu, m_s), weights = _compress(x, m / scale)

    def negative_with(penalty: float) -> Any:
        def negative(log_params: Array) -> float:
            params = np.exp(log_params)
            value = -float(np.dot(weights, gamma_gamma_log_likelihood(params, xu, m_s)))
            value += penalty * float(np.sum(log_params**2))
            return value if math.isfinite(value) else 1e300

        return negative

    start = np.array([1.0, 2.0, 1.0])
    params, _, iterations = _maximise(negative_with(0.0), start)
    regularised = False
    if np.any(params > RUNAWAY) or np.any(params < 1 / RUNAWAY):
        params, _, iterations = _maximise(negative_with(RIDGE), start)
        regularised = True
    _check_fit(dict(zip(("p", "q", "gamma"), (float(v) for v in params), strict=True)))
    params[2] *= scale
    ll = float(np.sum(gamma_gamma_log_likelihood(params, x, m)))
    p, q, v = (float(value) for value in params)
    fit = GammaGamma(p, q, v, ll, len(x), iterations, regularised)
    if q <= 1:
        raise InsufficientDataError(
            "the spend model has no finite mean (q <= 1): spend per order varies too wildly "
            "for the data at hand",
            fix="collect more orders; until then the value uses the average order value",
        )
    return fit


def _check_fit(params: dict[str, float]) -> None:
    for name, value in params.items():
        if not math.isfinite(value) or value > 1e8 or value < 1e-8:
            raise InsufficientDataError(
                f"the model did not settle (parameter {name} ran off to {value:.3g}): the "
                "purchase history does not carry enough information",
                fix="collect a longer purchase history and try again",
            )


# -- from transactions to the model's summary ----------------------------------------------------


@dataclass
class Summary:
    """Per customer: repeat purchases x, last purchase t_x and age T (weeks), mean repeat spend."""

    customer: list[str]
    x: Array
    t_x: Array
    T: Array
    m: Array
    first: list[date] = field(default_factory=list)


def summarise(customers: list[str], days: list[date], values: list[float], end: date) -> Summary:
    """Summarise transactions (one per row) up to and including `end`.

    Several purchases of one customer on one day are one transaction (their values add up), as
    in the papers. x counts the days with a purchase after the first; t_x and T run from the
    first purchase to the last one and to `end`, in weeks.
    """
    per_day: dict[tuple[str, date], float] = {}
    for who, day, value in zip(customers, days, values, strict=True):
        if day <= end:
            per_day[(who, day)] = per_day.get((who, day), 0.0) + float(value)
    by_customer: dict[str, list[tuple[date, float]]] = {}
    for (who, day), value in per_day.items():
        by_customer.setdefault(who, []).append((day, value))
    ids = sorted(by_customer)
    x = np.zeros(len(ids))
    t_x = np.zeros(len(ids))
    T = np.zeros(len(ids))
    m = np.zeros(len(ids))
    firsts: list[date] = []
    for i, who in enumerate(ids):
        purchases = sorted(by_customer[who])
        first = purchases[0][0]
        firsts.append(first)
        x[i] = len(purchases) - 1
        t_x[i] = (purchases[-1][0] - first).days / WEEK
        T[i] = (end - first).days / WEEK
        repeat = [v for _, v in purchases[1:]]
        m[i] = sum(repeat) / len(repeat) if repeat else 0.0
    return Summary(ids, x, t_x, T, m, firsts)


# -- the CDNOW validation -------------------------------------------------------------------------

CDNOW_START = date(1997, 1, 1)
CDNOW_CALIBRATION_END = date(1997, 9, 30)  # end of week 39
CDNOW_HOLDOUT_END = date(1998, 6, 30)  # end of week 78
PUBLISHED_BGNBD = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
PUBLISHED_LL = -9582.4
PUBLISHED_GAMMA_GAMMA = {"p": 6.25, "q": 3.74, "gamma": 15.44}


def read_cdnow_sample(path: Path) -> tuple[list[str], list[date], list[float]]:
    """The 2,357-customer sample: master id, sample id, YYYYMMDD, CDs, dollars (no header)."""
    customers: list[str] = []
    days: list[date] = []
    values: list[float] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        customers.append(parts[1])
        text = parts[2]
        days.append(date(int(text[:4]), int(text[4:6]), int(text[6:])))
        values.append(float(parts[4]))
    return customers, days, values


def cdnow_validation(directory: Path) -> dict[str, Any]:
    """Fit both models on weeks 1-39 of the CDNOW sample and check weeks 40-78."""
    customers, days, values = read_cdnow_sample(directory / "CDNOW_sample.txt")
    calibration = summarise(customers, days, values, CDNOW_CALIBRATION_END)
    fit = fit_bgnbd(calibration.x, calibration.t_x, calibration.T)
    spend = fit_gamma_gamma(calibration.x, calibration.m)
    # holdout: transactions (distinct days) per customer in weeks 40-78
    holdout_days = {
        (who, day)
        for who, day in zip(customers, days, strict=True)
        if CDNOW_CALIBRATION_END < day <= CDNOW_HOLDOUT_END
    }
    actual_by: dict[str, int] = {}
    for who, _ in holdout_days:
        actual_by[who] = actual_by.get(who, 0) + 1
    horizon = (CDNOW_HOLDOUT_END - CDNOW_CALIBRATION_END).days / WEEK
    expected = fit.expected_purchases(horizon, calibration.x, calibration.t_x, calibration.T)
    actual = np.array([actual_by.get(who, 0) for who in calibration.customer], dtype=np.float64)
    by_frequency = []
    for k in range(8):
        chosen = calibration.x == k if k < 7 else calibration.x >= 7
        by_frequency.append(
            {
                "repeat_purchases": f"{k}" if k < 7 else "7+",
                "customers": int(np.count_nonzero(chosen)),
                "expected_per_customer": round(float(np.mean(expected[chosen])), 3),
                "actual_per_customer": round(float(np.mean(actual[chosen])), 3),
            }
        )
    published = {
        name: {
            "fitted": round(value, 4),
            "published": PUBLISHED_BGNBD[name],
            "difference_percent": round(100 * (value / PUBLISHED_BGNBD[name] - 1), 3),
        }
        for name, value in fit.params().items()
    }
    spend_published = {
        name: {
            "fitted": round(value, 4),
            "published": PUBLISHED_GAMMA_GAMMA[name],
            "difference_percent": round(100 * (value / PUBLISHED_GAMMA_GAMMA[name] - 1), 3),
        }
        for name, value in spend.params().items()
    }
    return {
        "customers": fit.customers,
        "repeaters": fit.repeaters,
        "calibration": f"{CDNOW_START} .. {CDNOW_CALIBRATION_END} (weeks 1-39)",
        "holdout": f"{CDNOW_CALIBRATION_END + timedelta(days=1)} .. {CDNOW_HOLDOUT_END} "
        "(weeks 40-78)",
        "bgnbd": published,
        "log_likelihood": round(fit.log_likelihood, 2),
        "published_log_likelihood": PUBLISHED_LL,
        "gamma_gamma": spend_published,
        "gamma_gamma_log_likelihood": round(spend.log_likelihood, 2),
        "holdout_forecast": round(float(expected.sum()), 1),
        "holdout_actual": int(actual.sum()),
        "holdout_error_percent": round(100 * (float(expected.sum()) / int(actual.sum()) - 1), 2),
        "by_frequency": by_frequency,
        "fit": asdict(fit),
        "spend_fit": asdict(spend),
    }


# -- per profile ----------------------------------------------------------------------------------

HORIZON_WEEKS = 52.0


def purchase_summary(backend: Any, now: datetime) -> Any:
    """Ibis table: profile_id, x, t_x, T (weeks) and m (mean repeat spend) from the orders."""
    import ibis

    from kilde.insights.data import days_between, orders

    o = orders(backend)
    o = o.filter(o.timestamp <= ibis.literal(now))
    daily = o.group_by("profile_id", day=o.timestamp.truncate("D")).aggregate(value=o.revenue.sum())
    per = daily.group_by("profile_id").aggregate(
        days=daily.count(),
        first=daily.day.min(),
        last=daily.day.max(),
        total=daily.value.sum(),
        first_value=daily.value.argmin(daily.day),
    )
    x = (per.days - 1).cast("float64")
    return per.select(
        "profile_id",
        x=x,
        t_x=days_between(per.last, per.first) / WEEK,
        T=ibis.greatest(days_between(now, per.first), 1.0) / WEEK,
        m=ibis.ifelse(x > 0, (per.total - per.first_value) / x, 0.0),
    )


@dataclass
class ProfileValues:
    """Per-profile results of the lifetime-value models, aligned with `profile_id`."""

    profile_id: list[str]
    expected_purchases: Array
    p_alive: Array
    expected_spend: Array
    clv: Array
    fit: BgNbd | None
    spend_fit: GammaGamma | None
    problem: str | None
    horizon_weeks: float


def score_profiles(summary: Any, horizon_weeks: float = HORIZON_WEEKS) -> ProfileValues:
    """Fit both models on the profiles' purchase summaries (a pyarrow table) and score them.

    When a model cannot be fitted (too little data), the values are NaN and `problem` says why.
    """
    ids = [str(v) for v in summary.column("profile_id").to_pylist()]
    x = summary.column("x").to_numpy(zero_copy_only=False).astype(np.float64)
    t_x = summary.column("t_x").to_numpy(zero_copy_only=False).astype(np.float64)
    T = summary.column("T").to_numpy(zero_copy_only=False).astype(np.float64)
    m = summary.column("m").to_numpy(zero_copy_only=False).astype(np.float64)
    t_x = np.minimum(t_x, T)
    nan = np.full(len(ids), np.nan)
    sample = np.arange(len(ids))
    if len(ids) > FIT_SAMPLE:
        sample = np.sort(np.random.default_rng(0).choice(len(ids), FIT_SAMPLE, replace=False))
    try:
        fit = fit_bgnbd(x[sample], t_x[sample], T[sample])
    except InsufficientDataError as exc:
        return ProfileValues(ids, nan, nan, nan, nan, None, None, exc.message, horizon_weeks)
    purchases = fit.expected_purchases(horizon_weeks, x, t_x, T)
    alive = fit.p_alive(x, t_x, T)
    problem = None
    spend_fit: GammaGamma | None
    try:
        spend_fit = fit_gamma_gamma(x[sample], m[sample])
        spend = spend_fit.expected_spend(x, m)
    except InsufficientDataError as exc:
        spend_fit = None
        problem = exc.message
        spend = nan
    return ProfileValues(
        ids, purchases, alive, spend, purchases * spend, fit, spend_fit, problem, horizon_weeks
    )
