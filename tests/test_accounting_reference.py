"""popri_flwr.privacy.accounting against independent references (no dp-accounting, no stored
outputs).

The mechanism: each round releases ``sum_{i in B} v_i + N(0, sigma^2)`` (sensitivity 1), ``B`` a
Poisson sample at rate ``q``, composed over ``T`` rounds, add/remove one client. Three references
are computed here from first principles with numpy/scipy:

* **Upper bound (RDP, integer orders).** Mironov, Talwar and Zhang 2019 (arXiv:1908.10530): for
  integer ``alpha >= 2`` the sampled Gaussian is ``(alpha, log(A_alpha) / (alpha - 1))``-RDP with
  ``A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))``; RDP adds up
  over rounds and is converted with Balle et al. 2020 (arXiv:2004.00010, Prop. 12), the
  conversion the module documents. Our RDP accountant restricted to the same orders must agree.
* **Exact value at q = 1.** ``T`` Gaussian rounds are one Gaussian with noise multiplier
  ``s = sigma / sqrt(T)``, whose exact privacy profile is (Balle and Wang 2018)
  ``delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s)``; inverted numerically.
* **Lower bound at q < 1.** Post-processing: the sum of the ``T`` releases has law
  ``P = sum_k Bin(T, q)(k) N(k, T sigma^2)`` with the client and ``Q = N(0, T sigma^2)`` without,
  so the exact ``(eps, delta)`` curve of the pair ``(P, Q)`` (both orders) lower-bounds the true
  one. The likelihood ratio is increasing, so the hockey-stick divergence is a sum of normal
  tails (checked against direct numerical integration below). At ``q = 1`` it is exact.

A correct accountant is sandwiched: ``lower <= PLD <= RDP <= RDP(integer orders)``. A wrong
sampling rate (e.g. ``q^2`` for ``q``) falls far outside.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import log_ndtr

from popri_flwr.privacy.accounting import (
    DEFAULT_ORDERS,
    calibrate_noise_multiplier,
    compute_epsilon,
)

#: Integer Renyi orders, all of them also in DEFAULT_ORDERS (so the default can only do better).
INT_ORDERS = (*range(2, 11), *range(12, 64), 128, 256)

#: (sigma, q, rounds, delta) with q < 1; the first is the demo's PLD-calibrated setting.
SUBSAMPLED_POINTS = [
    (1.4126, 0.1, 3, 1e-5),  # demo: eps 1, q 0.1, 3 rounds
    (1.6108, 0.1, 3, 1e-5),  # demo, RDP-calibrated sigma
    (1.0, 0.1, 10, 1e-5),
    (0.9, 0.01, 100, 1e-5),
    (0.8, 0.05, 50, 1e-6),
    (2.0, 0.5, 20, 3e-6),
    (5.0, 0.3, 31, 3e-6),
    (1.2, 0.2, 5, 1e-5),
]

#: (sigma, rounds, delta) at q = 1.
FULL_POINTS = [
    (19.3, 20, 3e-6),  # POPri, epsilon about 1
    (3.35, 20, 3e-6),  # POPri, epsilon about 7
    (19.3, 31, 3e-6),
    (1.0, 1, 1e-5),
    (0.7, 50, 1e-3),  # huge epsilon (coarser PLD grid)
    (50.0, 200, 1e-8),
    (300.0, 31, 1e-5),  # small epsilon
]

#: PLD excess over the exact epsilon at q = 1 allowed: 1e-5 absolute up to epsilon 1, relative
#: above. Measured at FULL_POINTS: at most 2.4e-6 absolute (epsilon <= 7), 3.7e-6 relative.
PLD_Q1_TOL = 1e-5


# --------------------------------------------------------------------------- references


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def _log_binom(n: int, k: np.ndarray) -> np.ndarray:
    return np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in k])


def ref_rdp_log_a(alpha: int, q: float, sigma: float) -> float:
    """``log A_alpha`` of the sampled Gaussian, integer ``alpha`` (MTZ 2019, Sec. 3.3)."""
    if q == 1.0:
        return alpha * (alpha - 1) / (2.0 * sigma**2)
    k = np.arange(alpha + 1, dtype=float)
    terms = (
        _log_binom(alpha, k)
        + (alpha - k) * math.log1p(-q)
        + k * math.log(q)
        + (k * k - k) / (2.0 * sigma**2)
    )
    return _logsumexp(terms)


def ref_rdp_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """Integer-order RDP epsilon: ``T`` compositions + Balle et al. 2020 conversion."""
    best = math.inf
    for alpha in INT_ORDERS:
        rdp = rounds * ref_rdp_log_a(alpha, q, sigma) / (alpha - 1)
        eps = rdp + math.log1p(-1.0 / alpha) - math.log(delta * alpha) / (alpha - 1)
        best = min(best, eps)
    return max(0.0, best)


def _invert(delta_of_eps, delta: float) -> float:
    """Smallest ``eps >= 0`` with ``delta_of_eps(eps) <= delta`` (it is decreasing)."""
    if delta_of_eps(0.0) <= delta:
        return 0.0
    hi = 1.0
    while delta_of_eps(hi) > delta:
        hi *= 2.0
    return brentq(lambda e: delta_of_eps(e) - delta, 0.0, hi, xtol=1e-13, rtol=1e-14)


def ref_gaussian_delta(eps: float, s: float) -> float:
    """Exact ``delta(eps)`` of the Gaussian mechanism, sensitivity 1, noise multiplier ``s``."""
    return math.exp(log_ndtr(1.0 / (2 * s) - eps * s)) - math.exp(
        eps + log_ndtr(-1.0 / (2 * s) - eps * s)
    )


def ref_gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Exact epsilon of ``rounds`` full-participation rounds (one Gaussian, ``sigma/sqrt(T)``)."""
    s = sigma / math.sqrt(rounds)
    return _invert(lambda e: ref_gaussian_delta(e, s), delta)


def _sum_statistic(sigma: float, q: float, rounds: int):
    """Means, log-weights and std of ``P`` (sum of the releases, with the client)."""
    if q == 1.0:
        k = np.array([float(rounds)])
        logw = np.array([0.0])
    else:
        k = np.arange(rounds + 1, dtype=float)
        logw = _log_binom(rounds, k) + k * math.log(q) + (rounds - k) * math.log1p(-q)
    return k, logw, sigma * math.sqrt(rounds)


def ref_sum_statistic_delta(eps: float, sigma: float, q: float, rounds: int) -> float:
    """``max(H_{e^eps}(P||Q), H_{e^eps}(Q||P))`` for the sum statistic, in closed form.

    ``log(p/q)(x) = logsumexp_k(log w_k + (2 k x - k^2) / (2 v))`` increases in ``x``, so
    ``{p > e^eps q}`` is a half-line ``x > x*`` and ``{q > e^eps p}`` a half-line ``x < x'``.
    """
    k, logw, sd = _sum_statistic(sigma, q, rounds)
    var = sd * sd

    def log_ratio(x: float) -> float:
        return _logsumexp(logw + (2.0 * k * x - k * k) / (2.0 * var))

    def solve(level: float) -> float:
        lo, hi = -1.0, 1.0
        while log_ratio(lo) > level:
            lo *= 2.0
        while log_ratio(hi) < level:
            hi *= 2.0
        return brentq(lambda x: log_ratio(x) - level, lo, hi, xtol=1e-12, rtol=1e-15)

    x_rem = solve(eps)  # with the client (P) vs without (Q)
    remove = math.exp(_logsumexp(logw + log_ndtr((k - x_rem) / sd))) - math.exp(
        eps + log_ndtr(-x_rem / sd)
    )
    add = 0.0  # without vs with; empty region when e^-eps <= min ratio = (1-q)^T
    if q == 1.0 or -eps > float(logw[0]):
        x_add = solve(-eps)
        add = math.exp(log_ndtr(x_add / sd)) - math.exp(
            eps + _logsumexp(logw + log_ndtr((x_add - k) / sd))
        )
    return max(remove, add, 0.0)


def ref_lower_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """Exact epsilon of the sum statistic: a lower bound on the mechanism's (exact at q = 1)."""
    return _invert(lambda e: ref_sum_statistic_delta(e, sigma, q, rounds), delta)


def _integrated_delta(eps: float, sigma: float, q: float, rounds: int) -> float:
    """``ref_sum_statistic_delta`` by brute-force quadrature on a fine grid (a check of it)."""
    k, logw, sd = _sum_statistic(sigma, q, rounds)
    x = np.linspace(-12 * sd, rounds + 12 * sd, 400_001)
    norm = 1.0 / (sd * math.sqrt(2 * math.pi))
    p = (np.exp(logw)[:, None] * np.exp(-((x[None, :] - k[:, None]) ** 2) / (2 * sd * sd))).sum(0)
    p *= norm
    qq = norm * np.exp(-(x**2) / (2 * sd * sd))
    remove = np.trapezoid(np.maximum(p - math.exp(eps) * qq, 0.0), x)
    add = np.trapezoid(np.maximum(qq - math.exp(eps) * p, 0.0), x)
    return float(max(remove, add))


# --------------------------------------------------------------------------- the references agree


@pytest.mark.parametrize(("sigma", "rounds", "delta"), FULL_POINTS[:4])
def test_reference_lower_bound_is_exact_at_full_participation(sigma, rounds, delta):
    exact = ref_gaussian_epsilon(sigma, rounds, delta)
    assert ref_lower_epsilon(sigma, 1.0, rounds, delta) == pytest.approx(exact, rel=1e-9)
    # The integer-order RDP bound is an upper bound of the exact value.
    assert ref_rdp_epsilon(sigma, 1.0, rounds, delta) >= exact


@pytest.mark.parametrize(
    ("eps", "sigma", "q", "rounds"),
    [(0.2, 1.4126, 0.1, 1), (0.4, 1.4126, 0.1, 3), (0.3, 2.0, 0.5, 2), (0.5, 1.0, 1.0, 1)],
)
def test_reference_hockey_stick_matches_quadrature(eps, sigma, q, rounds):
    closed = ref_sum_statistic_delta(eps, sigma, q, rounds)
    assert closed > 1e-4
    assert _integrated_delta(eps, sigma, q, rounds) == pytest.approx(closed, rel=1e-6)
    if q == 1.0:
        assert ref_gaussian_delta(eps, sigma / math.sqrt(rounds)) == pytest.approx(closed, rel=1e-9)


# --------------------------------------------------------------------------- RDP


def test_reference_orders_are_default_orders():
    assert set(map(float, INT_ORDERS)) <= set(DEFAULT_ORDERS)


@pytest.mark.parametrize(("sigma", "q", "rounds", "delta"), SUBSAMPLED_POINTS)
def test_rdp_matches_integer_order_bound(sigma, q, rounds, delta):
    ref = ref_rdp_epsilon(sigma, q, rounds, delta)
    ours_int = compute_epsilon(sigma, q, rounds, delta, accounting="rdp", orders=INT_ORDERS)
    assert ours_int == pytest.approx(ref, rel=1e-6)
    # More (fractional) orders can only lower epsilon, and only a little.
    ours = compute_epsilon(sigma, q, rounds, delta, accounting="rdp")
    assert 0.9 * ref <= ours <= ref * (1 + 1e-9)


# --------------------------------------------------------------------------- PLD


@pytest.mark.parametrize(("sigma", "rounds", "delta"), FULL_POINTS)
def test_pld_full_participation_vs_closed_form(sigma, rounds, delta):
    exact = ref_gaussian_epsilon(sigma, rounds, delta)
    pld = compute_epsilon(sigma, 1.0, rounds, delta, accounting="pld")
    # Pessimistic estimate: never below the exact value, and only just above it.
    assert exact * (1 - 1e-12) <= pld <= exact + PLD_Q1_TOL * max(1.0, exact)
    assert compute_epsilon(sigma, 1.0, rounds, delta, accounting="rdp") >= pld


@pytest.mark.parametrize(("sigma", "q", "rounds", "delta"), SUBSAMPLED_POINTS)
def test_pld_subsampled_between_independent_bounds(sigma, q, rounds, delta):
    pld = compute_epsilon(sigma, q, rounds, delta, accounting="pld")
    lower = ref_lower_epsilon(sigma, q, rounds, delta)
    upper = ref_rdp_epsilon(sigma, q, rounds, delta)
    assert lower <= pld <= upper
    assert pld <= compute_epsilon(sigma, q, rounds, delta, accounting="rdp")
    # More rounds never spend less: the one-round exact epsilon is below the T-round bound.
    assert ref_lower_epsilon(sigma, q, 1, delta) <= lower


def test_spec_values_full_participation():
    # Spec: sigma 19.3, q 1, 20 rounds, delta 3e-6 -> PLD about 0.92, RDP about 0.997.
    assert ref_gaussian_epsilon(19.3, 20, 3e-6) == pytest.approx(0.92, abs=0.005)
    assert compute_epsilon(19.3, 1.0, 20, 3e-6, accounting="pld") == pytest.approx(0.92, abs=0.005)
    assert compute_epsilon(19.3, 1.0, 20, 3e-6, accounting="rdp") == pytest.approx(0.997, abs=5e-4)


# --------------------------------------------------------------------------- calibration


def _root_sigma(eps_of_sigma, target: float) -> float:
    return brentq(lambda s: eps_of_sigma(s) - target, 0.3, 100.0, xtol=1e-10)


def test_calibrated_demo_sigma_against_references():
    target, delta, rounds, q, tol = 1.0, 1e-5, 3, 0.1, 1e-3
    sigma_rdp_int = _root_sigma(lambda s: ref_rdp_epsilon(s, q, rounds, delta), target)
    sigma_lower = _root_sigma(lambda s: ref_lower_epsilon(s, q, rounds, delta), target)
    assert 1.3 < sigma_lower < sigma_rdp_int < 1.7  # the references themselves are sane

    rdp = calibrate_noise_multiplier(target, delta, rounds, q, tol=tol, accounting="rdp")
    # The default orders include fractional ones, so a little below the integer-order sigma.
    assert 0.98 * sigma_rdp_int <= rdp <= sigma_rdp_int * (1 + tol)
    assert rdp == pytest.approx(1.61, abs=0.01)  # spec

    pld = calibrate_noise_multiplier(target, delta, rounds, q, tol=tol, accounting="pld")
    assert sigma_lower <= pld <= sigma_rdp_int
    assert ref_lower_epsilon(pld, q, rounds, delta) <= target
    assert pld == pytest.approx(1.41, abs=0.01)  # spec


@pytest.mark.parametrize(("rounds", "delta"), [(31, 3e-6), (20, 3e-6), (5, 1e-5)])
def test_calibrated_full_participation_sigma_against_closed_form(rounds, delta):
    tol = 1e-3
    exact = _root_sigma(lambda s: ref_gaussian_epsilon(s, rounds, delta), 1.0)
    pld = calibrate_noise_multiplier(1.0, delta, rounds, 1.0, tol=tol, accounting="pld")
    assert exact <= pld <= exact * (1 + 1.5 * tol)
    rdp = calibrate_noise_multiplier(1.0, delta, rounds, 1.0, tol=tol, accounting="rdp")
    assert rdp > pld * (1 + 2 * tol)  # RDP is looser, so asks for visibly more noise


@pytest.mark.parametrize(("q", "rounds", "delta"), [(0.1, 3, 1.1e-5), (1.0, 31, 3.1e-6)])
def test_pld_calibration_is_fast(q, rounds, delta):
    # Unusual deltas, so nothing is cached. Measured 0.2-0.6 s on 2 shared cores; the bound only
    # catches a grid made much finer (1e-5 takes about a minute).
    start = time.perf_counter()
    calibrate_noise_multiplier(1.0, delta, rounds, q, accounting="pld")
    assert time.perf_counter() - start < 15.0
