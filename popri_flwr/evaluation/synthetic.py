"""The final synthetic set: N texts from a run's generator (base model + its LoRA adapter).

The downstream evaluation of the paper trains a small LM on texts sampled from the *final*
generator. :func:`generate_synthetic` rebuilds that generator from a run directory and samples
with the run's own prompt construction and sampling settings:

* prompts: POPri's prompt (``strategy.prompt_style``) over ``strategy.shots`` texts drawn from
  the run's public set (``public_set.jsonl``), one prompt per ``samples_per_prompt`` texts;
* sampling: ``generation.temperature``, ``top_p``, ``max_new_tokens``, then the sample is cut at
  the next "Original Text Sample" marker and truncated to ``generation.truncate_tokens``.

Output is JSONL, one ``{"index", "prompt_index", "text"}`` object per line, written batch by
batch. Every text has its own random stream, seeded by ``(seed, index)`` and used through the
Gumbel-max trick (``argmax(logits / T + Gumbel noise)`` over the top-p set samples exactly
``softmax(logits / T)`` restricted to top-p), so no draw depends on which other texts share the
batch. A file that stopped early is continued where it stopped, and equals the file an
uninterrupted call writes (the batch holding the first missing index is recomputed with the same
members, so even the padding is the same). A sidecar ``<out>.meta.json`` records what the texts
depend on; continuing with other settings is refused.

No Flower imports: the benchmark and the ``popri-generate`` CLI call this directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popri_flwr.config import RunConfig
from popri_flwr.models.generation import SamplingParams, generate_samples, render_prompts
from popri_flwr.models.index_sampling import IndexSeededGenerator, prompt_for
from popri_flwr.models.loading import load_generator_model
from popri_flwr.run_dir import atomic_write_text, find_adapter, read_run_config

logger = logging.getLogger(__name__)

#: Mixed into the per-index seeds so that prompts and sampling noise use different streams.
PROMPT_TAG, NOISE_TAG = 0x50524F4D, 0x4E4F4953
#: Offset of the zero-shot public set's seed (the one POPri uses when it builds it).
_PUBLIC_SEED_OFFSET = 7919


# ----------------------------------------------------------------------------- reading
def load_texts_jsonl(path: str | Path, field: str = "text") -> list[str]:
    """Texts of a JSONL file, one object per line (blank lines skipped).

    Parameters
    ----------
    path
        The JSONL file (e.g. written by :func:`generate_synthetic`).
    field
        Key of the text in each object.

    Returns
    -------
    list of str
        The texts in file order (blank texts included, so indices stay aligned).

    Raises
    ------
    ValueError
        ``"<path>: no such file"``, ``"<path>: line N is not valid JSON ..."``,
        ``"<path>: line N has no 'text' field"``, ``"<path>: line N: 'text' is not a string"``
        or ``"<path>: no texts (empty synthetic set)"`` (no line, or only blank texts).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}: line {number} has no {field!r} field")
            if not isinstance(row[field], str):
                raise ValueError(f"{path}: line {number}: {field!r} is not a string")
            texts.append(row[field])
    if not any(t.strip() for t in texts):
        raise ValueError(f"{path}: no texts (empty synthetic set)")
    return texts


# ----------------------------------------------------------------------------- the file
def _meta_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".meta.json")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_texts(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def _read_existing(out_path: Path) -> list[dict[str, Any]]:
    """Rows already written; a torn last line (crash while writing) is dropped."""
    if not out_path.exists():
        return []
    lines = out_path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: dropping a torn last line %d", out_path, number)
                break
            raise ValueError(f"{out_path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict) or "text" not in row:
            raise ValueError(f"{out_path}: line {number} has no 'text' field")
        if row.get("index", number - 1) != number - 1:
            raise ValueError(f"{out_path}: line {number} holds index {row.get('index')}")
        rows.append(row)
    return rows


def _dump_rows(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@dataclass
class _Plan:
    """Everything the texts depend on, resolved from the arguments and the run's config."""

    cfg: RunConfig
    out_path: Path
    n: int
    model_name: str
    adapter_path: Path | None
    adapter_round: int | None
    public_texts: Sequence[str] | None  # None: built zero-shot after the model is loaded
    params: SamplingParams
    batch_size: int
    samples_per_prompt: int
    shots: int
    seed: int
    prompt_style: str = "list"
    description: str = ""

    def meta(self) -> dict[str, Any]:
        weights = self.adapter_path / "adapter_model.safetensors" if self.adapter_path else None
        return {
            "model": self.model_name,
            "adapter": str(self.adapter_path) if self.adapter_path else None,
            "adapter_round": self.adapter_round,
            "adapter_sha256": _sha256_file(weights) if weights and weights.is_file() else None,
            "public_set_sha256": None
            if self.public_texts is None
            else _sha256_texts(self.public_texts),
            "seed": self.seed,
            "shots": self.shots,
            # Only when not the default, so files written before the key existed stay valid.
            **({"prompt_style": self.prompt_style} if self.prompt_style != "list" else {}),
            "samples_per_prompt": self.samples_per_prompt,
            "sampling": asdict(self.params),
            "batch_size": self.batch_size,
        }


#: Meta keys that may differ when a file is continued (paths move; the batch size is kept).
_FREE_META_KEYS = ("adapter", "batch_size")


def generate_synthetic(
    run_dir: str | Path | None,
    n: int,
    out_path: str | Path | None = None,
    *,
    model: str | None = None,
    adapter: bool | str | Path = True,
    batch_size: int | None = None,
    seed: int | None = None,
    samples_per_prompt: int = 1,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    config: RunConfig | None = None,
    public_texts: Sequence[str] | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    temperature: float | None = None,
    top_p: float | None = None,
) -> Path:
    """Write ``n`` synthetic texts from a run's final generator to a JSONL file (resumable).

    Parameters
    ----------
    run_dir
        A run directory (``config.yaml``, ``public_set.jsonl``, ``adapter/``). None: no run;
        settings come from ``config`` (default :class:`RunConfig`), the model from ``model``,
        and the public set from ``public_texts`` or is generated zero-shot as POPri does.
    n
        Number of texts (> 0). A file with more lines is cut to ``n`` (the first ``n`` are
        what a fresh call writes).
    out_path
        The JSONL file; default ``run_dir/synthetic.jsonl``. If it already holds ``k`` lines
        written with the same settings, generation continues at index ``k``.
    model
        Base model (default: the run's ``generation.model``).
    adapter
        True: the adapter of the run's last finished round (:func:`find_adapter`). False: the
        base model alone. A path: that PEFT adapter directory.
    batch_size
        Texts per forward batch (default ``generation.batch_size``). A continued file keeps the
        batch size it was started with, so it equals an uninterrupted one.
    seed
        Seeds prompts and sampling (default: the run's ``seed``).
    samples_per_prompt
        Texts per few-shot prompt; text ``i`` uses prompt ``i // samples_per_prompt``.
    device, cache_dir
        Default: the run's ``generation.device`` / ``generation.cache_dir``.
    config
        Settings when ``run_dir`` is None (ignored otherwise).
    public_texts
        The few-shot pool (default: the run's ``public_set.jsonl``).
    num_threads
        torch CPU threads while generating (default ``generation.num_threads``; None: leave
        torch's setting). On a shared 2-core machine one thread is often faster than two.
    progress
        Show a tqdm bar.
    temperature, top_p
        Sampling of the final set (default: the run's ``generation.temperature`` / ``top_p``).
        The loop needs spread between the samples of a prompt to find preference pairs; the
        released set may be sampled cooler (fewer broken fragments) without touching privacy,
        since it only reads the released adapter.

    Returns
    -------
    Path
        ``out_path``, holding exactly ``n`` lines ``{"index", "prompt_index", "text"}``.

    Raises
    ------
    ValueError
        ``n: ...``; a missing run directory / ``config.yaml`` / ``public_set.jsonl`` (message
        starts with the path); an adapter that does not fit the base model; an output file
        written with other settings.
    """
    plan = _make_plan(
        run_dir,
        n,
        out_path,
        model,
        adapter,
        batch_size,
        seed,
        samples_per_prompt,
        config,
        public_texts,
        temperature,
        top_p,
    )
    # Check what is already on disk before loading any model.
    rows = _read_existing(plan.out_path)
    meta = plan.meta()
    meta_path = _meta_path(plan.out_path)
    old_meta = json.loads(meta_path.read_text()) if rows and meta_path.exists() else None
    if rows and old_meta is None:
        raise ValueError(
            f"{plan.out_path}: holds {len(rows)} lines but no {meta_path.name}, so their "
            "settings are unknown; delete it or choose another output file"
        )
    if old_meta is not None:
        _check_same_settings(plan.out_path, old_meta, meta)
        if old_meta.get("batch_size") != plan.batch_size:
            logger.info(
                "%s: continuing with its batch size %s (asked %d)",
                plan.out_path,
                old_meta["batch_size"],
                plan.batch_size,
            )
        plan.batch_size = meta["batch_size"] = int(old_meta["batch_size"])
    if len(rows) >= plan.n:
        if len(rows) > plan.n:
            logger.info("%s: keeping the first %d of %d texts", plan.out_path, n, len(rows))
        if len(rows) > plan.n or not plan.out_path.read_text(encoding="utf-8").endswith("\n"):
            atomic_write_text(plan.out_path, _dump_rows(rows[: plan.n]))
        return plan.out_path

    g = plan.cfg.generation
    with _torch_threads(num_threads if num_threads is not None else g.num_threads):
        mdl, tokenizer = load_generator_model(
            plan.model_name,
            plan.adapter_path,
            device=device or g.device,
            cache_dir=cache_dir if cache_dir is not None else g.cache_dir,
        )
        if plan.public_texts is None:
            plan.public_texts = _zero_shot_public_set(plan.cfg, mdl, tokenizer, plan.batch_size)
            meta["public_set_sha256"] = _sha256_texts(plan.public_texts)
            if old_meta is not None:
                _check_same_settings(plan.out_path, old_meta, meta)
        if len(plan.public_texts) < plan.shots:
            raise ValueError(
                f"strategy.shots: {plan.shots} examples per prompt, but the public set has "
                f"only {len(plan.public_texts)} texts"
            )
        plan.out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        _append_texts(plan, rows, mdl, tokenizer, progress)
    return plan.out_path


def _make_plan(
    run_dir: str | Path | None,
    n: int,
    out_path: str | Path | None,
    model: str | None,
    adapter: bool | str | Path,
    batch_size: int | None,
    seed: int | None,
    samples_per_prompt: int,
    config: RunConfig | None,
    public_texts: Sequence[str] | None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> _Plan:
    """Validate the arguments and resolve them against the run (no model loaded)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    if temperature is not None and not float(temperature) >= 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature!r}")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")
    if not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: must be >= 1, got {samples_per_prompt!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if run_dir is not None:
        run_dir = Path(run_dir)
        cfg = read_run_config(run_dir)
    else:
        cfg = config or RunConfig()
        if adapter is True:
            adapter = False  # no run, no adapter of its own
    if out_path is None:
        if run_dir is None:
            raise ValueError("out_path: required when no run directory is given")
        out_path = run_dir / "synthetic.jsonl"
    adapter_path: Path | None = None
    adapter_round = None
    if adapter is True:
        adapter_path, adapter_round = find_adapter(run_dir)
    elif adapter not in (False, None):
        adapter_path = Path(adapter)
    if public_texts is None and run_dir is not None:
        public_path = run_dir / "public_set.jsonl"
        if not public_path.is_file():
            raise ValueError(f"{public_path}: missing; the run never built its public set")
        public_texts = load_texts_jsonl(public_path)
    g = cfg.generation
    if g.backend != "transformers":
        logger.info("generation.backend=%s: synthetic texts use transformers", g.backend)
    seed = cfg.seed if seed is None else int(seed)
    return _Plan(
        cfg=cfg,
        out_path=Path(out_path),
        n=int(n),
        model_name=model or g.model,
        adapter_path=adapter_path,
        adapter_round=adapter_round,
        public_texts=None if public_texts is None else list(public_texts),
        params=SamplingParams(
            temperature=g.temperature if temperature is None else float(temperature),
            top_p=g.top_p if top_p is None else float(top_p),
            max_new_tokens=g.max_new_tokens,
            truncate_tokens=g.truncate_tokens,
            seed=seed,
        ),
        batch_size=int(batch_size or g.batch_size),
        samples_per_prompt=samples_per_prompt,
        shots=cfg.strategy.shots,
        seed=seed,
        prompt_style=cfg.strategy.prompt_style,
        description=cfg.public_set.description,
    )


def _check_same_settings(out_path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in {**old, **new}:  # a key only one side has (prompt_style) is a difference too
        value = new.get(key)
        if key in _FREE_META_KEYS or (key == "public_set_sha256" and value is None):
            continue  # a zero-shot public set is compared once it is built
        if old.get(key) != value:
            raise ValueError(
                f"{out_path}: was written with other settings ({key}: {old.get(key)!r}, now "
                f"{value!r}); delete it or choose another output file"
            )


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's CPU thread count for the block (None: unchanged)."""
    if threads is None:
        yield
        return
    import torch

    if threads < 1:
        raise ValueError(f"generation.num_threads: must be >= 1, got {threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _append_texts(
    plan: _Plan, rows: list[dict[str, Any]], model: Any, tokenizer: Any, progress: bool
) -> None:
    """Keep ``rows`` (drops a torn line) and append texts ``len(rows) .. n - 1``."""
    from tqdm.auto import tqdm

    out_path, n, done = plan.out_path, plan.n, len(rows)
    atomic_write_text(out_path, _dump_rows(rows))
    logger.info(
        "Generating %d synthetic texts (%d done) with %s%s into %s",
        n,
        done,
        plan.model_name,
        f" + {plan.adapter_path}" if plan.adapter_path else "",
        out_path,
    )
    empty = 0
    size = plan.batch_size
    bar = tqdm(total=n, initial=done, desc="synthetic", unit="text", disable=not progress)
    with open(out_path, "a", encoding="utf-8") as fh:
        # Batches are aligned to multiples of batch_size: the one holding index `done` is
        # recomputed whole, so every text sees the same batch mates as in one uninterrupted run.
        for start in range((done // size) * size, n, size):
            indices = list(range(start, min(start + size, n)))
            prompt_ids = [i // plan.samples_per_prompt for i in indices]
            messages = [
                prompt_for(
                    plan.public_texts,
                    p,
                    plan.seed,
                    plan.shots,
                    style=plan.prompt_style,
                    description=plan.description,
                )
                for p in prompt_ids
            ]
            prompts = render_prompts(tokenizer, messages, plan.prompt_style)
            gen = IndexSeededGenerator(model, tokenizer, indices, plan.seed)
            texts = [t[0] for t in generate_samples(gen, prompts, plan.params, 1, tokenizer)]
            new = [
                {"index": i, "prompt_index": p, "text": t}
                for i, p, t in zip(indices, prompt_ids, texts, strict=True)
                if i >= done
            ]
            fh.write(_dump_rows(new))
            fh.flush()
            os.fsync(fh.fileno())
            empty += sum(1 for r in new if not r["text"].strip())
            bar.update(len(new))
    bar.close()
    if empty:
        logger.info("%s: %d of the new texts are empty", out_path, empty)


def _zero_shot_public_set(cfg: RunConfig, model: Any, tokenizer: Any, batch_size: int):
    """POPri's public set for a run-less call: from ``public_set.path`` or zero-shot."""
    from popri_flwr.algorithms.public_set import build_public_set
    from popri_flwr.models.generation import TransformersGenerator

    p = cfg.public_set
    params = SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        max_new_tokens=p.max_new_tokens,
        truncate_tokens=None,
        seed=cfg.seed + _PUBLIC_SEED_OFFSET,
    )
    generator = TransformersGenerator(model, tokenizer, batch_size=batch_size, progress=False)
    return build_public_set(
        generator, p.description, p.size, params, path=p.path, tokenizer=tokenizer
    )


__all__ = ["generate_synthetic", "load_texts_jsonl"]
