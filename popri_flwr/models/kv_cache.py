"""The name under which transformers passes a decoder's key/value cache.

transformers 5.25 renamed the ``past_key_values`` argument and output field to ``cache``; the
old name still works there, with a FutureWarning, until 5.40. Code that drives a decoder by hand
(prefix-shared sampling, the tilt's fit) passes and reads the cache through these helpers, so
it runs on both sides of the rename.
"""

from __future__ import annotations

from functools import cache as _memo
from typing import Any


@_memo
def cache_arg() -> str:
    """``"cache"`` where the installed transformers uses that name, else ``"past_key_values"``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to a causal LM's forward."""
    return {cache_arg(): cache}


def cache_of(out: Any) -> Any:
    """The key/value cache a causal LM's forward returned in ``out``."""
    return getattr(out, cache_arg())
