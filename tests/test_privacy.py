"""Tests for popri_flwr.privacy.accounting and the popri-privacy CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from popri_flwr.cli.privacy import build_parser
from popri_flwr.cli.privacy import main as cli_main
from popri_flwr.privacy.accounting import (
    ACCOUNTING_METHODS,
    DEFAULT_ACCOUNTING,
    DEFAULT_ORDERS,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    calibrate_noise_multiplier,
    compute_epsilon,
)

BOTH = pytest.mark.parametrize("accounting", ACCOUNTING_METHODS)

# `python -m` puts the working directory on sys.path, so run it from the repo root.
REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- reference values


def test_accounting_methods_and_default():
    assert ACCOUNTING_METHODS == ("pld", "rdp")
    assert DEFAULT_ACCOUNTING == "pld"
    assert compute_epsilon(19.3, 1.0, 20, 3e-6) == compute_epsilon(
        19.3, 1.0, 20, 3e-6, accounting="pld"
    )


@pytest.mark.parametrize(
    ("sigma", "rounds", "expected"),
    [
        (19.3, 20, 0.997),  # POPri, epsilon 1
        (3.35, 20, 6.96),  # POPri, epsilon 7
        (19.3, 31, 1.26),
        (11.3, 11, 1.29),  # PrE-Text published sigma
        (2.31, 11, 7.58),
    ],
)
def test_reference_rdp_epsilons_full_participation(sigma, rounds, expected):
    # Reference values (RDP) are given to 3 significant digits; 0.5% covers the rounding only.
    eps = compute_epsilon(sigma, 1.0, rounds, 3e-6, accounting="rdp")
    assert eps == pytest.approx(expected, rel=5e-3)
    # PLD is tighter (tested against the exact value in test_accounting_reference.py).
    assert compute_epsilon(sigma, 1.0, rounds, 3e-6, accounting="pld") < eps


def _closed_form_rdp(sigma: float, rounds: int, orders) -> np.ndarray:
    # Gaussian mechanism with sensitivity 1 and std sigma: RDP(alpha) = alpha / (2 sigma^2).
    return rounds * np.asarray(orders, dtype=float) / (2.0 * sigma**2)


def _balle_conversion(orders, rdp, delta: float) -> float:
    # arXiv:2004.00010 Prop. 12: eps = rdp + log(1 - 1/a) - log(delta * a) / (a - 1).
    a = np.asarray(orders, dtype=float)
    eps = rdp + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1.0)
    return float(max(0.0, eps.min()))


def _classic_conversion(orders, rdp, delta: float) -> float:
    # Mironov 2017 Prop. 3: eps = rdp + log(1/delta) / (a - 1).
    a = np.asarray(orders, dtype=float)
    return float((rdp + math.log(1.0 / delta) / (a - 1.0)).min())


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta"),
    [(19.3, 20, 3e-6), (3.35, 20, 3e-6), (1.0, 1, 1e-5), (0.7, 50, 1e-3), (50.0, 200, 1e-8)],
)
def test_full_participation_matches_closed_form_gaussian_rdp(sigma, rounds, delta):
    eps = compute_epsilon(sigma, 1.0, rounds, delta, accounting="rdp")
    rdp = _closed_form_rdp(sigma, rounds, DEFAULT_ORDERS)
    assert eps == pytest.approx(_balle_conversion(DEFAULT_ORDERS, rdp, delta), rel=1e-9)
    # The classic conversion is looser, so it can never be below our value.
    assert _classic_conversion(DEFAULT_ORDERS, rdp, delta) >= eps
    # Sanity: the classic bound is not wildly looser (same orders, same RDP curve).
    assert _classic_conversion(DEFAULT_ORDERS, rdp, delta) < 1.5 * eps


def test_default_orders_follow_opacus():
    opacus = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    assert set(opacus) <= set(DEFAULT_ORDERS)
    assert all(a > 1 for a in DEFAULT_ORDERS)


@BOTH
def test_edge_cases(accounting):
    assert compute_epsilon(0.0, 1.0, 5, 1e-5, accounting=accounting) == math.inf
    assert compute_epsilon(0.0, 0.1, 5, 1e-5, accounting=accounting) == math.inf
    assert compute_epsilon(1.0, 0.1, 0, 1e-5, accounting=accounting) == 0.0
    assert compute_epsilon(0.0, 1.0, 0, 1e-5, accounting=accounting) == 0.0
    assert 0.0 <= compute_epsilon(1e6, 1.0, 3, 1e-5, accounting=accounting) < 1e-3


def test_orders_only_matter_for_rdp():
    assert compute_epsilon(2.0, 0.5, 10, 1e-5, accounting="pld", orders=(2.0,)) == compute_epsilon(
        2.0, 0.5, 10, 1e-5, accounting="pld"
    )
    few = compute_epsilon(2.0, 0.5, 10, 1e-5, accounting="rdp", orders=(2.0,))
    assert few > compute_epsilon(2.0, 0.5, 10, 1e-5, accounting="rdp")


def test_repeated_queries_are_cached_and_identical():
    args = (2.345, 0.37, 17, 1.23e-5)
    first = compute_epsilon(*args)
    start = time.perf_counter()
    for _ in range(100):
        assert compute_epsilon(*args) == first
    assert time.perf_counter() - start < 1.0  # 100 uncached PLD evaluations take seconds


# --------------------------------------------------------------------------- monotonicity


@BOTH
def test_subsampling_amplifies(accounting):
    for sigma in (0.8, 2.0, 10.0):
        full = compute_epsilon(sigma, 1.0, 10, 1e-5, accounting=accounting)
        half = compute_epsilon(sigma, 0.5, 10, 1e-5, accounting=accounting)
        tenth = compute_epsilon(sigma, 0.1, 10, 1e-5, accounting=accounting)
        assert tenth < half < full


@BOTH
def test_monotone_in_sigma_and_rounds(accounting):
    def eps(sigma, q, rounds, delta=1e-5):
        return compute_epsilon(sigma, q, rounds, delta, accounting=accounting)

    for q in (0.05, 1.0):
        eps_by_sigma = [eps(s, q, 10) for s in (0.3, 0.6, 1.0, 2.0, 4.0, 8.0)]
        assert all(a > b for a, b in zip(eps_by_sigma, eps_by_sigma[1:], strict=False))
        eps_by_rounds = [eps(2.0, q, t) for t in (1, 2, 5, 20, 100)]
        assert all(a < b for a, b in zip(eps_by_rounds, eps_by_rounds[1:], strict=False))
    # Larger delta -> smaller epsilon.
    assert eps(2.0, 1.0, 10, 1e-3) < eps(2.0, 1.0, 10, 1e-7)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    ("target", "delta", "rounds", "q"),
    [
        (1.0, 3e-6, 20, 1.0),
        (7.0, 3e-6, 20, 1.0),
        (1.0, 1e-5, 5, 0.1),
        (4.0, 1e-5, 30, 0.02),
        (0.5, 1e-6, 1, 1.0),
    ],
)
@BOTH
def test_calibration_round_trip(target, delta, rounds, q, accounting):
    tol = 1e-3
    sigma = calibrate_noise_multiplier(target, delta, rounds, q, tol=tol, accounting=accounting)
    assert sigma > 0
    assert compute_epsilon(sigma, q, rounds, delta, accounting=accounting) <= target
    # Smallest such sigma, up to tol: a slightly smaller one overspends.
    assert compute_epsilon(sigma * (1 - 2 * tol), q, rounds, delta, accounting=accounting) > target


def test_calibration_default_is_pld_and_needs_less_noise_than_rdp():
    pld = calibrate_noise_multiplier(1.0, 1e-5, 3, 0.1)
    assert pld == calibrate_noise_multiplier(1.0, 1e-5, 3, 0.1, accounting="pld")
    assert pld < calibrate_noise_multiplier(1.0, 1e-5, 3, 0.1, accounting="rdp")


def test_calibration_agrees_with_reference_sigma():
    # POPri's sigma 19.3 for epsilon ~1 over 20 full rounds at delta 3e-6 (an RDP figure).
    sigma = calibrate_noise_multiplier(1.0, 3e-6, 20, 1.0, accounting="rdp")
    assert sigma == pytest.approx(19.3, rel=0.01)


@BOTH
def test_calibration_infinite_epsilon_means_no_noise(accounting):
    assert calibrate_noise_multiplier(math.inf, 1e-5, 10, 0.1, accounting=accounting) == 0.0


# --------------------------------------------------------------------------- accountant


@BOTH
@pytest.mark.parametrize(("rounds", "q"), [(20, 1.0), (4, 0.2)])
def test_accountant_spends_exactly_the_calibrated_rounds(rounds, q, accounting):
    acc = PrivacyAccountant.calibrated(1.0, 1e-5, rounds, q, accounting=accounting)
    assert acc.accounting == accounting
    assert acc.noise_multiplier == calibrate_noise_multiplier(
        1.0, 1e-5, rounds, q, accounting=accounting
    )
    assert acc.rounds_spent == 0
    assert acc.epsilon_spent == 0.0
    assert acc.would_exceed(rounds + 1)
    assert not acc.would_exceed(rounds)
    for i in range(rounds):
        assert not acc.would_exceed()
        acc.spend_round()
        assert acc.rounds_spent == i + 1
    assert acc.epsilon_spent <= 1.0
    assert acc.epsilon_spent == pytest.approx(acc.epsilon_after(0))
    assert acc.would_exceed()
    assert acc.epsilon_after(1) > 1.0
    with pytest.raises(PrivacyBudgetExceeded, match=r"epsilon .* > target 1"):
        acc.spend_round()
    assert acc.rounds_spent == rounds  # a refused round is not recorded


def test_accountant_uses_its_accounting():
    kwargs = dict(noise_multiplier=1.4126, sample_rate=0.1, delta=1e-5, target_epsilon=1.0)
    pld, rdp = PrivacyAccountant(**kwargs), PrivacyAccountant(**kwargs, accounting="rdp")
    assert pld.accounting == DEFAULT_ACCOUNTING == "pld"
    for acc in (pld, rdp):
        for t in (1, 3):
            expected = compute_epsilon(1.4126, 0.1, t, 1e-5, accounting=acc.accounting)
            assert acc.epsilon_after(t) == expected
    # sigma 1.4126 is the PLD calibration of epsilon 1 over 3 rounds; by RDP a single round
    # already spends 1.07.
    assert not pld.would_exceed(3)
    assert rdp.would_exceed(1)
    with pytest.raises(PrivacyBudgetExceeded, match="RDP accounting"):
        rdp.spend_round()
    assert rdp.rounds_spent == 0
    for _ in range(3):
        pld.spend_round()
    assert pld.epsilon_spent == compute_epsilon(1.4126, 0.1, 3, 1e-5, accounting="pld") <= 1.0


@BOTH
def test_accountant_state_dict_round_trip(accounting):
    acc = PrivacyAccountant(
        noise_multiplier=3.35, sample_rate=0.3, delta=3e-6, target_epsilon=7, accounting=accounting
    )
    for _ in range(3):
        acc.spend_round()
    state = json.loads(json.dumps(acc.state_dict()))
    assert state["accounting"] == accounting
    restored = PrivacyAccountant.from_state_dict(state)
    assert restored == acc
    assert restored.accounting == accounting
    assert restored.epsilon_spent == acc.epsilon_spent
    assert restored.epsilon_spent > 0


def test_old_state_without_accounting_resumes_with_rdp():
    acc = PrivacyAccountant(noise_multiplier=3.35, sample_rate=0.3, delta=3e-6, target_epsilon=7)
    acc.spend_round()
    old = {k: v for k, v in acc.state_dict().items() if k != "accounting"}
    restored = PrivacyAccountant.from_state_dict(old)
    assert restored.accounting == "rdp"
    assert restored.rounds_spent == 1
    assert restored.epsilon_spent == compute_epsilon(3.35, 0.3, 1, 3e-6, accounting="rdp")


@pytest.mark.parametrize("bad", ["x", "PLD", "gdp", ""])
def test_bad_accounting_names_key(bad):
    msg = rf"^privacy.accounting: expected one of \['pld', 'rdp'\], got {bad!r}$"
    with pytest.raises(ValueError, match=msg):
        PrivacyAccountant(
            noise_multiplier=1.0, sample_rate=1.0, delta=1e-5, target_epsilon=1.0, accounting=bad
        )
    with pytest.raises(ValueError, match=msg):
        compute_epsilon(1.0, 1.0, 5, 1e-5, accounting=bad)
    with pytest.raises(ValueError, match=msg):
        calibrate_noise_multiplier(1.0, 1e-5, 5, 1.0, accounting=bad)
    with pytest.raises(ValueError, match=msg):
        PrivacyAccountant.calibrated(1.0, 1e-5, 5, 1.0, accounting=bad)
    state = PrivacyAccountant(
        noise_multiplier=1.0, sample_rate=1.0, delta=1e-5, target_epsilon=1.0
    ).state_dict()
    with pytest.raises(ValueError, match=msg):
        PrivacyAccountant.from_state_dict({**state, "accounting": bad})


def test_accountant_without_privacy():
    acc = PrivacyAccountant(
        noise_multiplier=0.0, sample_rate=1.0, delta=1e-5, target_epsilon=math.inf
    )
    for _ in range(5):
        acc.spend_round()
    assert acc.rounds_spent == 5
    assert acc.epsilon_spent == math.inf
    assert not acc.would_exceed(1000)
    text = json.dumps(acc.state_dict(), allow_nan=False)  # strict JSON, no Infinity
    restored = PrivacyAccountant.from_state_dict(json.loads(text))
    assert restored.target_epsilon == math.inf
    assert restored.epsilon_spent == math.inf
    assert restored.rounds_spent == 5
    # Also accept a float inf written by other code.
    d = json.loads(text)
    d["target_epsilon"] = float("inf")
    assert PrivacyAccountant.from_state_dict(d).target_epsilon == math.inf


def test_accountant_noise_with_infinite_target_is_allowed():
    acc = PrivacyAccountant(
        noise_multiplier=2.0, sample_rate=1.0, delta=1e-5, target_epsilon=math.inf
    )
    acc.spend_round()
    assert 0 < acc.epsilon_spent < math.inf


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(target_epsilon=0.0), "privacy.epsilon"),
        (dict(target_epsilon=-1.0), "privacy.epsilon"),
        (dict(target_epsilon=math.nan), "privacy.epsilon"),
        (dict(delta=0.0), "privacy.delta"),
        (dict(delta=1.0), "privacy.delta"),
        (dict(sample_rate=0.0), "privacy.sample_rate"),
        (dict(sample_rate=1.5), "privacy.sample_rate"),
        (dict(rounds=0), "privacy.rounds"),
        (dict(rounds=2.5), "privacy.rounds"),
    ],
)
def test_calibration_bad_input_names_key(kwargs, key):
    args = dict(target_epsilon=1.0, delta=1e-5, rounds=5, sample_rate=1.0) | kwargs
    with pytest.raises(ValueError, match=rf"^{key}: "):
        calibrate_noise_multiplier(**args)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(noise_multiplier=-1.0), "privacy.noise_multiplier"),
        (dict(noise_multiplier=math.nan), "privacy.noise_multiplier"),
        (dict(noise_multiplier=0.0), "privacy.noise_multiplier"),  # finite target, no noise
        (dict(sample_rate=2.0), "privacy.sample_rate"),
        (dict(delta=-1e-5), "privacy.delta"),
        (dict(target_epsilon=0.0), "privacy.epsilon"),
        (dict(rounds_spent=-1), "privacy.rounds_spent"),
    ],
)
def test_accountant_bad_input_names_key(kwargs, key):
    args = dict(noise_multiplier=1.0, sample_rate=1.0, delta=1e-5, target_epsilon=1.0) | kwargs
    with pytest.raises(ValueError, match=rf"^{key}: "):
        PrivacyAccountant(**args)


def test_zero_noise_with_finite_target_says_how_to_opt_out():
    with pytest.raises(ValueError, match="set privacy.epsilon=inf explicitly"):
        PrivacyAccountant(noise_multiplier=0.0, sample_rate=1.0, delta=1e-5, target_epsilon=1.0)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ((-1.0, 1.0, 5, 1e-5), "privacy.noise_multiplier"),
        ((1.0, 0.0, 5, 1e-5), "privacy.sample_rate"),
        ((1.0, 1.0, -1, 1e-5), "privacy.rounds"),
        ((1.0, 1.0, 5, 0.0), "privacy.delta"),
    ],
)
def test_compute_epsilon_bad_input_names_key(args, key):
    with pytest.raises(ValueError, match=rf"^{key}: "):
        compute_epsilon(*args)


# --------------------------------------------------------------------------- CLI


def _value_after(label: str, text: str) -> float:
    for line in text.splitlines():
        if line.startswith(label):
            return float(line[len(label) :].split()[0])
    raise AssertionError(f"{label!r} not in output:\n{text}")


def _row(method: str, text: str) -> list[str]:
    """Cells of the side-by-side table row of ``method``."""
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] == method:
            return cells
    raise AssertionError(f"no {method!r} row in output:\n{text}")


EPS_ARGV = ["epsilon", "--noise-multiplier", "19.3", "--sample-rate", "1", "--rounds", "20",
            "--delta", "3e-6"]  # fmt: skip
SIGMA_ARGV = ["sigma", "--epsilon", "1", "--sample-rate", "0.1", "--rounds", "3",
              "--delta", "1e-5"]  # fmt: skip


def test_cli_epsilon_shows_both_accountants(capsys):
    assert cli_main(EPS_ARGV) == 0
    out = capsys.readouterr().out
    pld = compute_epsilon(19.3, 1.0, 20, 3e-6, accounting="pld")
    rdp = compute_epsilon(19.3, 1.0, 20, 3e-6, accounting="rdp")
    assert _value_after("epsilon:", out) == pytest.approx(pld, rel=1e-5)
    assert "(PLD)" in out.splitlines()[0]
    assert float(_row("pld", out)[1]) == pytest.approx(pld, rel=1e-5)
    assert float(_row("rdp", out)[1]) == pytest.approx(0.997, rel=5e-3)
    assert float(_row("rdp", out)[1]) == pytest.approx(rdp, rel=1e-5)
    assert "default" in " ".join(_row("pld", out)[2:])
    assert "default" not in " ".join(_row("rdp", out)[2:])

    assert cli_main([*EPS_ARGV, "--accounting", "rdp"]) == 0
    out = capsys.readouterr().out
    assert _value_after("epsilon:", out) == pytest.approx(rdp, rel=1e-5)
    assert "(RDP)" in out.splitlines()[0]
    assert "selected" in " ".join(_row("rdp", out)[2:])
    assert "default" in " ".join(_row("pld", out)[2:])

    assert cli_main([*EPS_ARGV, "--json", "--accounting", "rdp"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epsilon"] == result["epsilon_rdp"] == rdp
    assert result["epsilon_pld"] == pld
    assert result["accounting"] == "rdp"
    assert result["default_accounting"] == "pld"


def test_cli_sigma_text_and_json(capsys):
    assert cli_main(SIGMA_ARGV) == 0
    out = capsys.readouterr().out
    sigma = _value_after("noise_multiplier:", out)
    eps = _value_after("epsilon:", out)
    assert eps <= 1.0
    assert compute_epsilon(sigma, 0.1, 3, 1e-5, accounting="pld") == pytest.approx(eps, rel=1e-4)
    assert sigma == pytest.approx(1.41, abs=0.01)  # spec: PLD, the default
    pld_row, rdp_row = _row("pld", out), _row("rdp", out)
    assert float(pld_row[1]) == pytest.approx(sigma, rel=1e-5)
    assert float(rdp_row[1]) == pytest.approx(1.61, abs=0.01)  # spec: RDP
    assert float(rdp_row[2]) <= 1.0
    assert "default" in " ".join(pld_row[3:])

    assert cli_main([*SIGMA_ARGV, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["noise_multiplier"] == result["noise_multiplier_pld"]
    assert result["noise_multiplier"] == pytest.approx(sigma, rel=1e-5)
    assert result["epsilon"] <= result["target_epsilon"] == 1.0
    assert result["epsilon_rdp"] <= 1.0
    assert result["noise_multiplier_rdp"] > result["noise_multiplier_pld"]
    assert compute_epsilon(result["noise_multiplier"], 0.1, 3, 1e-5) == result["epsilon"]

    assert cli_main([*SIGMA_ARGV, "--json", "--accounting", "rdp"]) == 0
    rdp = json.loads(capsys.readouterr().out)
    assert rdp["accounting"] == "rdp"
    assert rdp["noise_multiplier"] == rdp["noise_multiplier_rdp"] == result["noise_multiplier_rdp"]
    assert rdp["noise_multiplier"] == calibrate_noise_multiplier(
        1.0, 1e-5, 3, 0.1, accounting="rdp"
    )


def test_cli_help_mentions_both_accountants(capsys):
    for argv in (["--help"], ["epsilon", "--help"], ["sigma", "--help"]):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "PLD" in out and "RDP" in out
    assert "--accounting {pld,rdp}" in out
    assert "default: pld" in out


def test_cli_json_infinite(capsys):
    argv = ["epsilon", "--noise-multiplier", "0", "--sample-rate", "1", "--rounds", "3"]
    assert cli_main([*argv, "--delta", "1e-5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epsilon"] == result["epsilon_pld"] == result["epsilon_rdp"] == "inf"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--rounds", "2",
          "--delta", "1e-5"], "privacy.sample_rate"),
        (["epsilon", "--noise-multiplier", "abc", "--sample-rate", "1", "--rounds", "2",
          "--delta", "1e-5"], "--noise-multiplier"),
        (["sigma", "--epsilon", "-1", "--sample-rate", "1", "--rounds", "2", "--delta", "1e-5"],
         "privacy.epsilon"),
        (["sigma", "--epsilon", "1", "--sample-rate", "1", "--rounds", "2", "--delta", "2"],
         "privacy.delta"),
        (["sigma", "--epsilon", "1", "--sample-rate", "1", "--rounds", "2"], "--delta"),
        (["sigma", "--epsilon", "1", "--sample-rate", "1", "--rounds", "2", "--delta", "1e-5",
          "--accounting", "gdp"], "--accounting"),
    ],
)  # fmt: skip
def test_cli_bad_values_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert needle in captured.err
    assert "error:" in captured.err
    assert "Traceback" not in captured.err


def test_cli_runs_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "popri_flwr.cli.privacy", "epsilon", "--noise-multiplier", "3.35",
         "--sample-rate", "1", "--rounds", "20", "--delta", "3e-6", "--json"],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["epsilon_rdp"] == pytest.approx(6.96, rel=5e-3)
    assert result["epsilon"] == result["epsilon_pld"] < result["epsilon_rdp"]

    bad = subprocess.run(
        [sys.executable, "-m", "popri_flwr.cli.privacy", "sigma", "--epsilon", "1",
         "--sample-rate", "0", "--rounds", "2", "--delta", "1e-5"],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "privacy.sample_rate" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
