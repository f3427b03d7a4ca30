"""``popri-privacy``: epsilon of a noise multiplier, or the noise multiplier for an epsilon.

Standalone front end to :mod:`popri_flwr.privacy` (client-level RDP accounting of the
Poisson-subsampled Gaussian mechanism). Also runnable as ``python -m popri_flwr.cli.privacy``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from popri_flwr.privacy import calibrate_noise_multiplier, compute_epsilon

_DESCRIPTION = """\
Client-level differential-privacy calculator for POPri runs.

Each round releases a sum of per-client contributions (each clipped to L2 norm C) plus
N(0, (noise_multiplier * C)^2) noise; clients are Poisson-sampled with rate --sample-rate
(1 = all clients every round, no amplification). Epsilon is computed with Renyi DP
(dp_accounting RdpAccountant, add/remove one client) composed over --rounds rounds.
"""

_EPILOG = """\
examples:
  popri-privacy epsilon --noise-multiplier 19.3 --sample-rate 1 --rounds 20 --delta 3e-6
      epsilon spent by 20 full-participation rounds at sigma 19.3 (about 0.997)
  popri-privacy sigma --epsilon 1 --sample-rate 0.1 --rounds 5 --delta 1e-5
      smallest noise multiplier that keeps 5 rounds at q=0.1 within epsilon 1
  popri-privacy sigma --epsilon 1 --sample-rate 1 --rounds 20 --delta 3e-6 --json
      the same as one JSON object (inf is written as the string "inf")
"""

# Library errors start with the config key; show the matching command-line flag as well.
_KEY_TO_FLAG = {
    "privacy.noise_multiplier": "--noise-multiplier",
    "privacy.sample_rate": "--sample-rate",
    "privacy.rounds": "--rounds",
    "privacy.delta": "--delta",
    "privacy.epsilon": "--epsilon",
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


def _json_float(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


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
        help="epsilon spent by a given noise multiplier",
        description="Print the epsilon spent by --rounds rounds at --noise-multiplier.",
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
        help="noise multiplier needed for a target epsilon",
        description=(
            "Print the smallest noise multiplier (binary search) whose --rounds rounds spend at "
            "most --epsilon, and the epsilon it achieves."
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


def main(argv: list[str] | None = None) -> int:
    """Run ``popri-privacy``; returns 0, or exits with status 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    subparser_prog = f"{parser.prog} {args.command}"
    try:
        if args.command == "epsilon":
            sigma = args.noise_multiplier
            epsilon = compute_epsilon(sigma, args.sample_rate, args.rounds, args.delta)
            result = {
                "epsilon": epsilon,
                "noise_multiplier": sigma,
                "sample_rate": args.sample_rate,
                "rounds": args.rounds,
                "delta": args.delta,
            }
        else:
            sigma = calibrate_noise_multiplier(
                args.epsilon, args.delta, args.rounds, args.sample_rate, tol=args.tol
            )
            epsilon = compute_epsilon(sigma, args.sample_rate, args.rounds, args.delta)
            result = {
                "noise_multiplier": sigma,
                "epsilon": epsilon,
                "target_epsilon": args.epsilon,
                "sample_rate": args.sample_rate,
                "rounds": args.rounds,
                "delta": args.delta,
            }
    except ValueError as exc:
        # argparse style ("prog: error: ..." on stderr, exit status 2), one line, no traceback.
        parser.exit(2, f"{subparser_prog}: error: {_flag_message(str(exc))}\n")

    if args.json:
        print(json.dumps({k: _json_float(v) for k, v in result.items()}))
        return 0
    setting = (
        f"sample_rate={args.sample_rate:g}, rounds={args.rounds}, delta={args.delta:g}, "
        "client-level, RDP"
    )
    if args.command == "epsilon":
        print(f"epsilon: {epsilon:.6g}")
        print(f"  (noise_multiplier={sigma:g}, {setting})")
    else:
        print(f"noise_multiplier: {sigma:.6g}")
        print(f"epsilon: {epsilon:.6g} (target {args.epsilon:g}, {setting})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
