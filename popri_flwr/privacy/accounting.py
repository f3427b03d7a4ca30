"""Client-level differential-privacy accounting for POPri.

Privacy unit: one client (add/remove-one neighbouring relation). Each round the server releases

    S = sum_{i in B} v_i + N(0, (sigma * C)^2 I),    ||v_i||_2 <= C,

where ``C`` is the clip norm (the L2 sensitivity of the sum when one client is added or removed),
``sigma`` the noise multiplier and ``B`` a Poisson sample of the clients: each client takes part
independently with probability ``q`` (``q = 1``: everybody, no amplification). Sampling and
accounting must match: the amplification below is valid for Poisson sampling only, not for a
fixed-size sample drawn without replacement.

One round is ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (plain ``GaussianDpEvent`` when
``q == 1``), composed ``T`` times. Two accountants of dp-accounting turn that into
``(epsilon, delta)``; both give valid upper bounds, so a run may use either:

``"pld"`` (default)
    Privacy loss distributions (``dp_accounting.pld.PLDAccountant``; Koskela et al. 2020,
    Doroshenko et al. 2022, arXiv:2207.04380): the privacy loss of one round is discretised on a
    grid, composed by FFT and converted with the exact hockey-stick divergence. The pessimistic
    estimate (dp-accounting's default) rounds every loss up, so the result is an upper bound whose
    excess over the exact epsilon shrinks with the grid; see
    :data:`PLD_VALUE_DISCRETIZATION_INTERVAL`. Tighter than RDP: sigma 19.3, q 1, 20 rounds,
    delta 3e-6 spend 0.92 instead of 0.997; epsilon 1 needs sigma 17.9 instead of 19.3 there,
    and 1.41 instead of 1.61 at q 0.1 over 3 rounds (delta 1e-5).
``"rdp"``
    Renyi DP (Mironov 2017). The Gaussian mechanism is ``(alpha, alpha / (2 sigma^2))``-RDP;
    Poisson subsampling gives the numerically computed RDP of the sampled Gaussian mechanism
    (Mironov, Talwar and Zhang 2019, arXiv:1908.10530). RDP composes additively and is converted
    with ``epsilon = min_alpha rdp_T(alpha) + log(1 - 1/alpha) - log(delta alpha) / (alpha - 1)``
    (Balle et al. 2020, arXiv:2004.00010, Prop. 12) by ``dp_accounting.rdp.RdpAccountant``; the
    orders follow Opacus. Runs checkpointed before PLD existed were accounted this way.

Results are cached (the accountant asks for the same epsilon several times per round).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

logger = logging.getLogger(__name__)

#: Accountants :func:`compute_epsilon` understands (config key ``privacy.accounting``).
ACCOUNTING_METHODS: tuple[str, ...] = ("pld", "rdp")

#: Accountant used unless one is named.
DEFAULT_ACCOUNTING = "pld"

#: Accountant of checkpoints written before ``accounting`` was stored in the state.
LEGACY_ACCOUNTING = "rdp"

#: Grid step of the privacy-loss values in the PLD accountant while the effective noise multiplier
#: ``s`` (``sigma / sqrt(T)`` at ``q = 1``, where T Gaussian rounds are one Gaussian; ``sigma``
#: otherwise) is at least ``1 / sqrt(2)``; below, the step grows as ``1 / (2 s^2)`` (the privacy
#: loss of the Gaussian), so the grid size and run time stay bounded while the error stays a tiny
#: fraction of the (then large) epsilon. Measured excess over the exact Gaussian epsilon at
#: ``q = 1``: at most 2.4e-6 absolute for epsilon up to 7 (e.g. 0.919487 vs 0.919485 at sigma
#: 19.3, 20 rounds), 3.7e-6 relative above; for ``q < 1``, over a 1e-5 grid: +2e-6 at the demo
#: (q 0.1, 3 rounds), +7e-5 at q 0.01, 100 rounds; never below. One evaluation takes 1-60 ms, a
#: calibration 0.1-1 s on 2 CPU cores (1e-4, dp-accounting's default, is 3-10 times slower).
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-3

#: Renyi orders used for accounting: Opacus' defaults plus two large ones for tiny epsilons.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)] + [128.0, 256.0]
)

# Relative slack when comparing a spent epsilon with the target: a run calibrated to spend
# exactly the target must not be refused its last round because of float rounding.
_BUDGET_RTOL = 1e-9

# Beyond this the target epsilon is unreachably small for any practical run.
_MAX_NOISE_MULTIPLIER = 1e7


class PrivacyBudgetExceeded(RuntimeError):
    """Spending another round would push epsilon past the target."""


# --------------------------------------------------------------------------- validation


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"privacy.delta: must be in (0, 1), got {delta!r}")
    return delta


def _check_sample_rate(sample_rate: float) -> float:
    sample_rate = float(sample_rate)
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"privacy.sample_rate: must be in (0, 1], got {sample_rate!r}")
    return sample_rate


def _check_noise_multiplier(noise_multiplier: float) -> float:
    noise_multiplier = float(noise_multiplier)
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(
            f"privacy.noise_multiplier: must be a finite number >= 0, got {noise_multiplier!r}"
        )
    return noise_multiplier


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not epsilon > 0.0:  # also rejects NaN
        raise ValueError(f"privacy.epsilon: must be > 0 (or inf for no privacy), got {epsilon!r}")
    return epsilon


def _check_rounds(rounds: int, *, minimum: int, key: str = "privacy.rounds") -> int:
    if isinstance(rounds, bool) or not float(rounds).is_integer():
        raise ValueError(f"{key}: must be an integer >= {minimum}, got {rounds!r}")
    rounds = int(rounds)
    if rounds < minimum:
        raise ValueError(f"{key}: must be an integer >= {minimum}, got {rounds!r}")
    return rounds


def _check_accounting(accounting: str) -> str:
    if accounting not in ACCOUNTING_METHODS:
        raise ValueError(
            f"privacy.accounting: expected one of {list(ACCOUNTING_METHODS)}, got {accounting!r}"
        )
    return str(accounting)


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    try:
        checked = tuple(float(a) for a in orders)
    except (TypeError, ValueError):
        raise ValueError(f"orders: expected a sequence of numbers > 1, got {orders!r}") from None
    if not checked or not all(a > 1.0 and math.isfinite(a) for a in checked):
        raise ValueError(f"orders: expected a non-empty sequence of numbers > 1, got {orders!r}")
    return checked


# --------------------------------------------------------------------------- accounting


class _CountFracOrderWarnings(logging.Filter):
    """Swallow dp_accounting's per-order "failed to converge" warnings, counting them.

    For small fractional orders and large ``sigma`` the sampled-Gaussian series may not converge;
    dp_accounting then sets that order's RDP to inf (conservative: the order is simply not used).
    A calibration evaluates dozens of sigmas, so these would flood the log.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "failed to converge" in str(record.msg):
            self.count += 1
            return False
        return True


@contextmanager
def _quiet_dp_accounting() -> Iterator[_CountFracOrderWarnings]:
    absl_logger = logging.getLogger("absl")
    filt = _CountFracOrderWarnings()
    absl_logger.addFilter(filt)
    try:
        yield filt
    finally:
        absl_logger.removeFilter(filt)


def _round_event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    return event


def _pld_interval(noise_multiplier: float, sample_rate: float, rounds: int) -> float:
    """Discretisation step of the PLD grid; see :data:`PLD_VALUE_DISCRETIZATION_INTERVAL`."""
    s = noise_multiplier / math.sqrt(rounds) if sample_rate == 1.0 else noise_multiplier
    return PLD_VALUE_DISCRETIZATION_INTERVAL * max(1.0, 1.0 / (2.0 * s * s))


@lru_cache(maxsize=4096)
def _pld_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    interval = _pld_interval(noise_multiplier, sample_rate, rounds)
    accountant = PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=interval,
    )
    with _quiet_dp_accounting():
        accountant.compose(_round_event(noise_multiplier, sample_rate), rounds)
        epsilon = float(accountant.get_epsilon(delta))
    logger.debug(
        "PLD epsilon=%.6g (sigma=%g, q=%g, T=%d, delta=%g, grid step %g)",
        epsilon,
        noise_multiplier,
        sample_rate,
        rounds,
        delta,
        interval,
    )
    return epsilon


@lru_cache(maxsize=4096)
def _rdp_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    orders: tuple[float, ...],
) -> float:
    accountant = RdpAccountant(list(orders), dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    with _quiet_dp_accounting() as excluded:
        accountant.compose(_round_event(noise_multiplier, sample_rate), rounds)
        epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
    if excluded.count:
        logger.debug(
            "%d Renyi orders excluded (series did not converge; conservative) for sigma=%g q=%g",
            excluded.count,
            noise_multiplier,
            sample_rate,
        )
    logger.debug(
        "RDP epsilon=%.6g (sigma=%g, q=%g, T=%d, delta=%g, optimal order %g)",
        epsilon,
        noise_multiplier,
        sample_rate,
        rounds,
        delta,
        order,
    )
    return float(epsilon)


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    *,
    accounting: str = DEFAULT_ACCOUNTING,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """Epsilon spent by ``rounds`` rounds of the (Poisson-subsampled) Gaussian mechanism.

    Composes ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (plain ``GaussianDpEvent``
    when ``q == 1``) ``rounds`` times (add/remove-one-client) in the accountant named by
    ``accounting`` and returns the epsilon at ``delta``.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``: noise std divided by the L2 sensitivity (clip norm). 0 means no noise.
    sample_rate : float
        Poisson sampling rate ``q`` in (0, 1]; 1 means full participation.
    rounds : int
        Number of compositions ``T >= 0``.
    delta : float
        Target delta in (0, 1).
    accounting : {"pld", "rdp"}, optional
        ``"pld"``: privacy loss distributions (pessimistic estimate, tight); ``"rdp"``: Renyi DP.
    orders : sequence of float, optional
        Renyi orders to optimise over (``"rdp"`` only).

    Returns
    -------
    float
        Epsilon; ``inf`` if ``noise_multiplier == 0`` (and ``rounds > 0``), ``0.0`` if
        ``rounds == 0``.
    """
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    sample_rate = _check_sample_rate(sample_rate)
    rounds = _check_rounds(rounds, minimum=0)
    delta = _check_delta(delta)
    accounting = _check_accounting(accounting)
    if accounting == "rdp":
        orders = _check_orders(orders)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    if accounting == "pld":
        return _pld_epsilon(noise_multiplier, sample_rate, rounds, delta)
    return _rdp_epsilon(noise_multiplier, sample_rate, rounds, delta, orders)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sample_rate: float,
    tol: float = 1e-3,
    *,
    accounting: str = DEFAULT_ACCOUNTING,
) -> float:
    """Smallest noise multiplier whose ``rounds``-round epsilon is at most ``target_epsilon``.

    Epsilon decreases monotonically in ``sigma``, so a bracket ``[lo, hi]`` with
    ``eps(lo) > target >= eps(hi)`` is grown upward by doubling and then bisected until
    ``hi - lo <= tol * hi / 2``. ``hi`` is returned, hence ``eps(result) <= target`` always and
    the result is within ``tol`` (relative) of the exact boundary.

    Parameters
    ----------
    target_epsilon : float
        Epsilon to spend over the whole run, > 0; ``math.inf`` means no privacy (returns 0.0).
    delta : float
        Target delta in (0, 1).
    rounds : int
        Number of rounds, >= 1.
    sample_rate : float
        Poisson sampling rate in (0, 1].
    tol : float, optional
        Relative precision of the returned sigma.
    accounting : {"pld", "rdp"}, optional
        Accountant measuring epsilon (see :func:`compute_epsilon`).

    Returns
    -------
    float
        The calibrated noise multiplier.
    """
    target_epsilon = _check_epsilon(target_epsilon)
    delta = _check_delta(delta)
    rounds = _check_rounds(rounds, minimum=1)
    sample_rate = _check_sample_rate(sample_rate)
    accounting = _check_accounting(accounting)
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol: must be in (0, 1), got {tol!r}")
    if math.isinf(target_epsilon):
        return 0.0

    def eps(sigma: float) -> float:
        return compute_epsilon(sigma, sample_rate, rounds, delta, accounting=accounting)

    lo, hi = 0.0, 1.0  # eps(0) = inf > target
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"privacy.epsilon: target {target_epsilon!r} is unreachable (needs a noise "
                f"multiplier > {_MAX_NOISE_MULTIPLIER:g} for {rounds} rounds at sample rate "
                f"{sample_rate!r}, delta {delta!r})"
            )
    while hi - lo > 0.5 * tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    logger.info(
        "calibrated noise multiplier %.6g: epsilon %.6g <= %g (delta=%g, rounds=%d, q=%g, %s)",
        hi,
        eps(hi),
        target_epsilon,
        delta,
        rounds,
        sample_rate,
        accounting.upper(),
    )
    return hi


def _encode_float(x: float) -> float | str:
    return "inf" if math.isinf(x) and x > 0 else float(x)


def _decode_float(x: float | str) -> float:
    return float(x)  # float("inf") and float(math.inf) both work


@dataclass
class PrivacyAccountant:
    """Running (epsilon, delta) budget of a federated run, one Gaussian release per round.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``; the per-round noise std is ``sigma * clip``.
    sample_rate : float
        Poisson client-sampling rate in (0, 1].
    delta : float
        Target delta in (0, 1).
    target_epsilon : float
        Budget for the whole run; ``math.inf`` claims no privacy (then ``sigma`` may be 0).
    rounds_spent : int
        Rounds already released (restored from a checkpoint).
    accounting : {"pld", "rdp"}
        Accountant measuring the spend (see :func:`compute_epsilon`).
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    target_epsilon: float
    rounds_spent: int = 0
    accounting: str = DEFAULT_ACCOUNTING

    def __post_init__(self) -> None:
        self.noise_multiplier = _check_noise_multiplier(self.noise_multiplier)
        self.sample_rate = _check_sample_rate(self.sample_rate)
        self.delta = _check_delta(self.delta)
        self.target_epsilon = _check_epsilon(self.target_epsilon)
        self.rounds_spent = _check_rounds(self.rounds_spent, minimum=0, key="privacy.rounds_spent")
        self.accounting = _check_accounting(self.accounting)
        if self.noise_multiplier == 0.0 and math.isfinite(self.target_epsilon):
            raise ValueError(
                "privacy.noise_multiplier: 0 means no privacy; set privacy.epsilon=inf explicitly"
            )

    @classmethod
    def calibrated(
        cls,
        target_epsilon: float,
        delta: float,
        rounds: int,
        sample_rate: float,
        *,
        accounting: str = DEFAULT_ACCOUNTING,
    ) -> PrivacyAccountant:
        """Accountant whose sigma spends at most ``target_epsilon`` in exactly ``rounds`` rounds."""
        sigma = calibrate_noise_multiplier(
            target_epsilon, delta, rounds, sample_rate, accounting=accounting
        )
        return cls(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            delta=delta,
            target_epsilon=target_epsilon,
            accounting=accounting,
        )

    @property
    def epsilon_spent(self) -> float:
        """Epsilon after the ``rounds_spent`` rounds released so far."""
        return compute_epsilon(
            self.noise_multiplier,
            self.sample_rate,
            self.rounds_spent,
            self.delta,
            accounting=self.accounting,
        )

    def epsilon_after(self, extra_rounds: int = 1) -> float:
        """Epsilon after ``extra_rounds`` more rounds."""
        extra_rounds = _check_rounds(extra_rounds, minimum=0, key="extra_rounds")
        return compute_epsilon(
            self.noise_multiplier,
            self.sample_rate,
            self.rounds_spent + extra_rounds,
            self.delta,
            accounting=self.accounting,
        )

    def would_exceed(self, extra_rounds: int = 1) -> bool:
        """Whether ``extra_rounds`` more rounds would spend more than ``target_epsilon``."""
        if math.isinf(self.target_epsilon):
            return False
        return self.epsilon_after(extra_rounds) > self.target_epsilon * (1.0 + _BUDGET_RTOL)

    def spend_round(self) -> None:
        """Record one more released round.

        Raises
        ------
        PrivacyBudgetExceeded
            If that round would push epsilon past ``target_epsilon``; nothing is recorded.
        """
        if self.would_exceed(1):
            raise PrivacyBudgetExceeded(
                f"privacy budget exceeded: round {self.rounds_spent + 1} would bring epsilon to "
                f"{self.epsilon_after(1):.6g} > target {self.target_epsilon:g} "
                f"(delta={self.delta:g}, noise_multiplier={self.noise_multiplier:g}, "
                f"sample_rate={self.sample_rate:g}, rounds spent {self.rounds_spent}, "
                f"{self.accounting.upper()} accounting)"
            )
        self.rounds_spent += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (inf stored as the string ``"inf"``).

        ``epsilon_spent`` is included for humans reading checkpoints; it is recomputed on load.
        """
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "target_epsilon": _encode_float(self.target_epsilon),
            "rounds_spent": self.rounds_spent,
            "accounting": self.accounting,
            "epsilon_spent": _encode_float(self.epsilon_spent),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> PrivacyAccountant:
        """Rebuild an accountant from :meth:`state_dict` output.

        States written before the accountant was stored lack ``"accounting"``; those runs were
        accounted with RDP, so they resume with ``"rdp"``.
        """
        required = ("noise_multiplier", "sample_rate", "delta", "target_epsilon")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"privacy state: missing keys {', '.join(missing)}")
        return cls(
            noise_multiplier=_decode_float(d["noise_multiplier"]),
            sample_rate=_decode_float(d["sample_rate"]),
            delta=_decode_float(d["delta"]),
            target_epsilon=_decode_float(d["target_epsilon"]),
            rounds_spent=int(d.get("rounds_spent", 0)),
            accounting=d.get("accounting", LEGACY_ACCOUNTING),
        )
