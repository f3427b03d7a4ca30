"""``popri-generate``: N synthetic texts from a run's final generator, as JSONL (resumable).

Examples
--------
    popri-generate outputs/my-run -n 2000                  # -> outputs/my-run/synthetic.jsonl
    popri-generate outputs/my-run -n 2000 -o syn.jsonl     # started again: continues the file
    popri-generate outputs/my-run -n 500 --no-adapter -o base.jsonl   # the base model alone
    popri-generate --model packaged:smollm2-135m-instruct --public-set pub.jsonl -n 100 -o x.jsonl

Also runnable as ``python -m popri_flwr.cli.generate``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from popri_flwr.config import ConfigError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``popri-generate`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="popri-generate",
        description=(
            "Write N synthetic texts from a run's generator (base model + the LoRA adapter of "
            "its last round) with the run's prompts and sampling settings. Lines are "
            '{"index", "prompt_index", "text"}; a file that stopped early is continued.'
        ),
        epilog="examples:\n" + __doc__.split("Examples\n--------\n")[1].split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir", nargs="?", type=Path, help="run directory (config.yaml, public_set.jsonl)"
    )
    parser.add_argument("-n", "--num", type=_positive_int, required=True, help="texts to write")
    parser.add_argument(
        "-o", "--out", type=Path, help="output JSONL (default RUN_DIR/synthetic.jsonl)"
    )
    parser.add_argument("--model", help="base model (default: the run's generation.model)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-adapter", action="store_true", help="use the base model alone")
    group.add_argument("--adapter", type=Path, help="a PEFT adapter directory to use instead")
    parser.add_argument(
        "--public-set",
        type=Path,
        help="few-shot pool (.jsonl/.json/.txt/.csv) instead of RUN_DIR/public_set.jsonl",
    )
    parser.add_argument("--batch-size", type=_positive_int, help="texts per forward batch")
    parser.add_argument("--seed", type=int, help="seed (default: the run's seed)")
    parser.add_argument(
        "--samples-per-prompt", type=_positive_int, default=1, help="texts per few-shot prompt"
    )
    parser.add_argument(
        "--temperature", type=float, help="sampling temperature (default: the run's)"
    )
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the run's)")
    parser.add_argument("--device", help="cpu, cuda or auto (default: the run's)")
    parser.add_argument("--cache-dir", help="cache of dequantized packaged models")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.run_dir is None and (args.out is None or args.model is None):
        parser.error("without RUN_DIR, --model and --out are required")
    try:
        from popri_flwr.evaluation.synthetic import generate_synthetic

        public = None
        if args.public_set is not None:
            from popri_flwr.data import load_public_texts

            public = load_public_texts(args.public_set, key="--public-set")
        adapter: bool | Path = not args.no_adapter
        if args.adapter is not None:
            adapter = args.adapter
        path = generate_synthetic(
            args.run_dir,
            args.num,
            args.out,
            model=args.model,
            adapter=adapter,
            batch_size=args.batch_size,
            seed=args.seed,
            samples_per_prompt=args.samples_per_prompt,
            device=args.device,
            cache_dir=args.cache_dir,
            public_texts=public,
            num_threads=args.threads,
            progress=not args.quiet,
            temperature=args.temperature,
            top_p=args.top_p,
        )
    except (ConfigError, ValueError) as err:
        print(f"popri-generate: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
