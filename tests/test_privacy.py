"""Tests for popri_flwr.privacy and the popri-privacy CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from popri_flwr.cli.privacy import main as cli_main
from popri_flwr.privacy import (
    DEFAULT_ORDERS,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    calibrate_noise_multiplier,
    compute_epsilon,
    gaussian_noise,
    noise_std,
)

# `python -m` puts the working directory on sys.path, so run it from the repo root.
REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- reference values


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
def test_reference_epsilons_full_participation(sigma, rounds, expected):
    # Reference values are given to 3 significant digits; 0.5% covers the rounding only.
    assert compute_epsilon(sigma, 1.0, rounds, 3e-6) == pytest.approx(expected, rel=5e-3)


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
    eps = compute_epsilon(sigma, 1.0, rounds, delta)
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


def test_edge_cases():
    assert compute_epsilon(0.0, 1.0, 5, 1e-5) == math.inf
    assert compute_epsilon(0.0, 0.1, 5, 1e-5) == math.inf
    assert compute_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert compute_epsilon(0.0, 1.0, 0, 1e-5) == 0.0


# --------------------------------------------------------------------------- monotonicity


def test_subsampling_amplifies():
    for sigma in (0.8, 2.0, 10.0):
        full = compute_epsilon(sigma, 1.0, 10, 1e-5)
        half = compute_epsilon(sigma, 0.5, 10, 1e-5)
        tenth = compute_epsilon(sigma, 0.1, 10, 1e-5)
        assert tenth < half < full


def test_monotone_in_sigma_and_rounds():
    for q in (0.05, 1.0):
        eps_by_sigma = [compute_epsilon(s, q, 10, 1e-5) for s in (0.6, 1.0, 2.0, 4.0, 8.0)]
        assert all(a > b for a, b in zip(eps_by_sigma, eps_by_sigma[1:], strict=False))
        eps_by_rounds = [compute_epsilon(2.0, q, t, 1e-5) for t in (1, 2, 5, 20, 100)]
        assert all(a < b for a, b in zip(eps_by_rounds, eps_by_rounds[1:], strict=False))
    # Larger delta -> smaller epsilon.
    assert compute_epsilon(2.0, 1.0, 10, 1e-3) < compute_epsilon(2.0, 1.0, 10, 1e-7)


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
def test_calibration_round_trip(target, delta, rounds, q):
    tol = 1e-3
    sigma = calibrate_noise_multiplier(target, delta, rounds, q, tol=tol)
    assert sigma > 0
    assert compute_epsilon(sigma, q, rounds, delta) <= target
    # Smallest such sigma, up to tol: a slightly smaller one overspends.
    assert compute_epsilon(sigma * (1 - 2 * tol), q, rounds, delta) > target


def test_calibration_agrees_with_reference_sigma():
    # POPri's sigma 19.3 for epsilon ~1 over 20 full rounds at delta 3e-6.
    sigma = calibrate_noise_multiplier(1.0, 3e-6, 20, 1.0)
    assert sigma == pytest.approx(19.3, rel=0.01)


def test_calibration_infinite_epsilon_means_no_noise():
    assert calibrate_noise_multiplier(math.inf, 1e-5, 10, 0.1) == 0.0


# --------------------------------------------------------------------------- accountant


@pytest.mark.parametrize(("rounds", "q"), [(20, 1.0), (4, 0.2)])
def test_accountant_spends_exactly_the_calibrated_rounds(rounds, q):
    acc = PrivacyAccountant.calibrated(1.0, 1e-5, rounds, q)
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


def test_accountant_state_dict_round_trip():
    acc = PrivacyAccountant(noise_multiplier=3.35, sample_rate=0.3, delta=3e-6, target_epsilon=7)
    for _ in range(3):
        acc.spend_round()
    restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored == acc
    assert restored.epsilon_spent == acc.epsilon_spent
    assert restored.epsilon_spent > 0


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


# --------------------------------------------------------------------------- noise


def test_noise_std_is_sigma_times_clip():
    assert noise_std(2.5, 0.4) == pytest.approx(1.0)
    assert noise_std(0.0, 3.0) == 0.0
    with pytest.raises(ValueError, match="^privacy.clip_norm: "):
        noise_std(1.0, 0.0)
    with pytest.raises(ValueError, match="^privacy.noise_multiplier: "):
        noise_std(-1.0, 1.0)


def test_gaussian_noise_statistics():
    std = 3.7
    x = gaussian_noise(200_000, std, np.random.default_rng(0))
    assert x.shape == (200_000,)
    assert x.std() == pytest.approx(std, rel=0.01)
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size)


def test_gaussian_noise_reproducible_and_uses_given_rng():
    np.random.seed(123)
    global_state = np.random.get_state()[1].copy()
    a = gaussian_noise((4, 5), 1.0, np.random.default_rng(7))
    b = gaussian_noise((4, 5), 1.0, np.random.default_rng(7))
    c = gaussian_noise((4, 5), 1.0, np.random.default_rng(8))
    assert a.shape == (4, 5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(np.random.get_state()[1], global_state)


def test_gaussian_noise_zero_std():
    rng = np.random.default_rng(0)
    z = gaussian_noise((3, 2), 0.0, rng)
    assert z.shape == (3, 2)
    assert not z.any()
    # Nothing was drawn: the generator continues exactly like a fresh one.
    assert rng.normal() == np.random.default_rng(0).normal()
    with pytest.raises(ValueError):
        gaussian_noise(3, -1.0, rng)


# --------------------------------------------------------------------------- CLI


def _value_after(label: str, text: str) -> float:
    for line in text.splitlines():
        if line.startswith(label):
            return float(line[len(label) :].split()[0])
    raise AssertionError(f"{label!r} not in output:\n{text}")


def test_cli_epsilon_prints_reference_value(capsys):
    rc = cli_main(
        ["epsilon", "--noise-multiplier", "19.3", "--sample-rate", "1", "--rounds", "20",
         "--delta", "3e-6"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert _value_after("epsilon:", out) == pytest.approx(0.997, rel=5e-3)


def test_cli_sigma_text_and_json(capsys):
    argv = ["sigma", "--epsilon", "1", "--sample-rate", "0.1", "--rounds", "5", "--delta", "1e-5"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    sigma = _value_after("noise_multiplier:", out)
    eps = _value_after("epsilon:", out)
    assert eps <= 1.0
    assert compute_epsilon(sigma, 0.1, 5, 1e-5) == pytest.approx(eps, rel=1e-4)

    assert cli_main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["noise_multiplier"] == pytest.approx(sigma, rel=1e-5)
    assert result["epsilon"] <= result["target_epsilon"] == 1.0
    assert compute_epsilon(result["noise_multiplier"], 0.1, 5, 1e-5) == result["epsilon"]


def test_cli_json_infinite(capsys):
    argv = ["epsilon", "--noise-multiplier", "0", "--sample-rate", "1", "--rounds", "3"]
    assert cli_main([*argv, "--delta", "1e-5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == "inf"


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
    assert json.loads(proc.stdout)["epsilon"] == pytest.approx(6.96, rel=5e-3)

    bad = subprocess.run(
        [sys.executable, "-m", "popri_flwr.cli.privacy", "sigma", "--epsilon", "1",
         "--sample-rate", "0", "--rounds", "2", "--delta", "1e-5"],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "privacy.sample_rate" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
