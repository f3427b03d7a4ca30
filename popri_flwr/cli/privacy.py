"""``popri-privacy``: epsilon of a noise multiplier, or the noise multiplier for an epsilon.

Standalone front end to :mod:`popri_flwr.privacy.accounting` (client-level accounting of the
Poisson-subsampled Gaussian mechanism). Every answer is given by both accountants, PLD (the
default) and RDP, side by side; ``--accounting`` picks the one reported as *the* answer (the first
line and the unsuffixed JSON keys), as ``privacy.accounting`` does for a run. Also runnable as
``python -m popri_flwr.cli.privacy``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from popri_flwr.privacy.accounting import (
    ACCOUNTING_METHODS,
    DEFAULT_ACCOUNTING,
    calibrate_noise_multiplier,
    compute_epsilon,
)

_DESCRIPTION = f"""\
Client-level differential-privacy calculator for POPri runs.

Each round releases a sum of per-client contributions (each clipped to L2 norm C) plus
N(0, (noise_multiplier * C)^2) noise; clients are Poisson-sampled with rate --sample-rate
(1 = all clients every round, no amplification). The --rounds rounds are composed (add/remove
one client) by two dp-accounting accountants, both shown side by side:

  pld  privacy loss distributions (PLDAccountant, pessimistic estimate): tight (the default)
  rdp  Renyi DP (RdpAccountant): a looser upper bound, so it asks for more noise (runs
       checkpointed before privacy.accounting existed were accounted with it)

--accounting (default: {DEFAULT_ACCOUNTING}) picks the one reported first and in the plain JSON
keys, as privacy.accounting does for a run.
"""

_EPILOG = """\
examples:
  popri-privacy epsilon --noise-multiplier 19.3 --sample-rate 1 --rounds 20 --delta 3e-6
      epsilon spent by 20 full-participation rounds at sigma 19.3 (PLD about 0.92, RDP 0.997)
  popri-privacy sigma --epsilon 1 --sample-rate 0.1 --rounds 3 --delta 1e-5
      smallest noise multiplier keeping 3 rounds at q=0.1 within epsilon 1 (PLD 1.41, RDP 1.61)
  popri-privacy sigma --epsilon 1 --sample-rate 1 --rounds 20 --delta 3e-6 --accounting rdp --json
      the same as one JSON object, RDP as the answer (inf is written as the string "inf")
"""

# Library errors start with the config key; show the matching command-line flag as well.
_KEY_TO_FLAG = {
    "privacy.noise_multiplier": "--noise-multiplier",
    "privacy.sample_rate": "--sample-rate",
    "privacy.rounds": "--rounds",
    "privacy.delta": "--delta",
    "privacy.epsilon": "--epsilon",
    "privacy.accounting": "--accounting",
    "tol": "--tol",
}


def _number(text: str) -> float:
    """Float parser for argparse (accepts ``inf``); argparse turns failures into exit 2."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _json_value(x: Any) -> Any:
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sample-rate",
        type=_number,
        required=True,
        metavar="Q",
        help="Poisson client-sampling rate in (0, 1]; 1 = full participation",
    )
    p.add_argument("--rounds", type=_integer, required=True, metavar="T", help="number of rounds")
    p.add_argument("--delta", type=_number, required=True, help="target delta in (0, 1)")
    p.add_argument(
        "--accounting",
        choices=ACCOUNTING_METHODS,
        default=DEFAULT_ACCOUNTING,
        help=(
            "accountant of the first line and of the plain JSON keys (both are always shown; "
            "default: %(default)s, like privacy.accounting)"
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``popri-privacy`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="popri-privacy",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{epsilon,sigma}")

    p_eps = sub.add_parser(
        "epsilon",
        help="epsilon spent by a given noise multiplier (PLD and RDP)",
        description=(
            "Print the epsilon spent by --rounds rounds at --noise-multiplier,\n"
            "by the PLD and by the RDP accountant."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_eps.add_argument(
        "--noise-multiplier",
        type=_number,
        required=True,
        metavar="SIGMA",
        help="noise std / clip norm (>= 0; 0 = no noise, epsilon inf)",
    )
    _add_common(p_eps)

    p_sig = sub.add_parser(
        "sigma",
        help="noise multiplier needed for a target epsilon (PLD and RDP)",
        description=(
            "Print the smallest noise multiplier (binary search) whose --rounds rounds spend at\n"
            "most --epsilon, and the epsilon it achieves, calibrated by the PLD and by the RDP\n"
            "accountant."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_sig.add_argument(
        "--epsilon",
        type=_number,
        required=True,
        help="target epsilon over the whole run (> 0; inf = no privacy, sigma 0)",
    )
    _add_common(p_sig)
    p_sig.add_argument(
        "--tol",
        type=_number,
        default=1e-3,
        help="relative precision of the noise multiplier (default: %(default)g)",
    )
    return parser


def _flag_message(message: str) -> str:
    key = message.split(":", 1)[0]
    flag = _KEY_TO_FLAG.get(key)
    return f"argument {flag}: {message}" if flag else message


def _note(method: str, selected: str) -> str:
    """``"default"`` and/or ``"selected"`` (by ``--accounting``) for a table row."""
    notes = []
    if method == DEFAULT_ACCOUNTING:
        notes.append("default")
    if method == selected:
        notes.append("selected")
    return ", ".join(notes)


def _compute(args: argparse.Namespace) -> dict[str, Any]:
    """Both accountants' answers, flat: ``epsilon_pld``, ``noise_multiplier_rdp``, ..."""
    common = {"sample_rate": args.sample_rate, "rounds": args.rounds, "delta": args.delta}
    result: dict[str, Any] = {}
    if args.command == "epsilon":
        sigma = args.noise_multiplier
        for method in ACCOUNTING_METHODS:
            result[f"epsilon_{method}"] = compute_epsilon(
                sigma, args.sample_rate, args.rounds, args.delta, accounting=method
            )
        sel = args.accounting
        return {
            "epsilon": result[f"epsilon_{sel}"],
            "accounting": sel,
            "default_accounting": DEFAULT_ACCOUNTING,
            "noise_multiplier": sigma,
            **common,
            **result,
        }
    for method in ACCOUNTING_METHODS:
        sigma = calibrate_noise_multiplier(
            args.epsilon, args.delta, args.rounds, args.sample_rate, tol=args.tol, accounting=method
        )
        result[f"noise_multiplier_{method}"] = sigma
        result[f"epsilon_{method}"] = compute_epsilon(
            sigma, args.sample_rate, args.rounds, args.delta, accounting=method
        )
    sel = args.accounting
    return {
        "noise_multiplier": result[f"noise_multiplier_{sel}"],
        "epsilon": result[f"epsilon_{sel}"],
        "accounting": sel,
        "default_accounting": DEFAULT_ACCOUNTING,
        "target_epsilon": args.epsilon,
        **common,
        **result,
    }


def _print_text(args: argparse.Namespace, r: dict[str, Any]) -> None:
    """The selected accountant's answer, then both side by side."""
    sel = args.accounting
    setting = (
        f"sample_rate={args.sample_rate:g}, rounds={args.rounds}, delta={args.delta:g};\n"
        "   client-level, add/remove one client, Poisson sampling)"
    )
    if args.command == "epsilon":
        print(f"epsilon: {r['epsilon']:.6g} ({sel.upper()})")
        print(f"  {'accounting':<12}epsilon")
        for m in ACCOUNTING_METHODS:
            print(f"  {m:<12}{r[f'epsilon_{m}']:<14.6g}{_note(m, sel)}".rstrip())
        print(f"  (noise_multiplier={args.noise_multiplier:g}, {setting}")
        return
    print(f"noise_multiplier: {r['noise_multiplier']:.6g} ({sel.upper()})")
    print(f"epsilon: {r['epsilon']:.6g} (target {args.epsilon:g})")
    print(f"  {'accounting':<12}{'noise_multiplier':<18}epsilon")
    for m in ACCOUNTING_METHODS:
        sigma, eps = r[f"noise_multiplier_{m}"], r[f"epsilon_{m}"]
        print(f"  {m:<12}{sigma:<18.6g}{eps:<14.6g}{_note(m, sel)}".rstrip())
    print(f"  ({setting}")


def main(argv: list[str] | None = None) -> int:
    """Run ``popri-privacy``; returns 0, or exits with status 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    subparser_prog = f"{parser.prog} {args.command}"
    try:
        result = _compute(args)
    except ValueError as exc:
        # argparse style ("prog: error: ..." on stderr, exit status 2), one line, no traceback.
        parser.exit(2, f"{subparser_prog}: error: {_flag_message(str(exc))}\n")

    if args.json:
        print(json.dumps({k: _json_value(v) for k, v in result.items()}))
    else:
        _print_text(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
