"""Defenses, picked by registered name. A defense is a pure data transform (IP), a context
manager over forward hooks (PPS), or nothing. Nothing edits the module tree: hooks are
registered on entry and removed in `finally`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

from ..errors import ConfigError
from ..config.schema import DefenseConfig, SteerConfig
from ..data import Messages
from ..data.conversations import apply_ip


class Defense(Protocol):
    """What training and the `training` eval condition need from a defense."""

    def conversations(self, conversations: list[Messages], seed: int) -> list[Messages]:
        """The conversations as the model sees them under the defense."""

    def active(self, model) -> ContextManager[None]:
        """Hooks that are on while the defense is applied (training forward passes)."""


@dataclass(frozen=True)
class _Transform:
    transform: Callable[[list[Messages], int], list[Messages]]

    def conversations(self, conversations: list[Messages], seed: int) -> list[Messages]:
        return self.transform(conversations, seed)

    def active(self, model) -> ContextManager[None]:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class _Steering:
    triples: list[SteerConfig]

    def conversations(self, conversations: list[Messages], seed: int) -> list[Messages]:
        return conversations

    def active(self, model) -> ContextManager[None]:
        return steer(model, [(load_vector(s, model), s.layer, s.coef) for s in self.triples])


def _none(cfg: DefenseConfig) -> Defense:
    return _Transform(lambda convs, seed: convs)


def _ip(cfg: DefenseConfig) -> Defense:
    return _Transform(lambda convs, seed: apply_ip(convs, cfg.ip, seed))


def _pps(cfg: DefenseConfig) -> Defense:
    return _Steering(list(cfg.pps))


DEFENSES: dict[str, Callable[[DefenseConfig], Defense]] = {"none": _none, "ip": _ip, "pps": _pps}


def make_defense(cfg: DefenseConfig) -> Defense:
    if cfg.kind not in DEFENSES:
        raise ConfigError(f"defense.kind={cfg.kind!r}: registered defenses are {', '.join(DEFENSES)}")
    return DEFENSES[cfg.kind](cfg)


# ---------------------------------------------------------------------------------------------
# Steering


def load_vector(s: SteerConfig, model):
    """The [hidden] vector for layer `s.layer` of `model` (see `read_vector`)."""
    from .models import model_layers

    return read_vector(s, len(model_layers(model)), model.config.get_text_config().hidden_size)


def read_vector(s: SteerConfig, n_layers: int, hidden: int):
    """The [hidden] vector for layer `s.layer` from a [num_layers+1, hidden] or [hidden] file."""
    import torch

    path = Path(s.vector)
    if not path.is_file():
        raise ConfigError(f"defense.pps: vector file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if s.key:
            if s.key not in tensors:
                raise ConfigError(f"{path}: no tensor {s.key!r} (has {', '.join(tensors)})")
            vec = tensors[s.key]
        elif len(tensors) == 1:
            vec = next(iter(tensors.values()))
        else:
            raise ConfigError(f"{path}: several tensors ({', '.join(tensors)}); set `key` in defense.pps")
    else:
        vec = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(vec, torch.Tensor):
            raise ConfigError(f"{path}: holds a {type(vec).__name__}, not a tensor")
    if not 1 <= s.layer <= n_layers:
        raise ConfigError(f"defense.pps: layer {s.layer} is outside 1..{n_layers} for this model")
    if vec.dim() == 2:
        if tuple(vec.shape) != (n_layers + 1, hidden):
            raise ConfigError(
                f"{path}: vector of shape {tuple(vec.shape)} does not match the model "
                f"(expected [{n_layers + 1}, {hidden}] = [num_layers+1, hidden], or [{hidden}])"
            )
        vec = vec[s.layer]
    elif vec.dim() != 1 or vec.shape[0] != hidden:
        raise ConfigError(
            f"{path}: vector of shape {tuple(vec.shape)} does not match the model's hidden size {hidden}"
        )
    return vec.detach().clone().float()


def _add_hook(delta):
    """Add `delta` (coef * vector: [hidden], or [batch, 1, hidden] for one coefficient per row)
    to the layer's output, cast to the output's dtype so a bf16 residual stream stays bf16."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + delta.to(h.dtype)
        return (h,) + output[1:] if isinstance(output, tuple) else h

    return hook


@contextlib.contextmanager
def steer(model, triples) -> Iterator[None]:
    """Add coef * v to the output of decoder layer `layer` (1-based) at every position."""
    from .models import model_layers

    layers = model_layers(model)
    handles = []
    try:
        for vector, layer, coef in triples:
            device = next(layers[layer - 1].parameters()).device
            coef = coef.to(device) if hasattr(coef, "to") else float(coef)
            # coef * v in float32, rounded once to the stream's dtype in the hook: added as is, a
            # float32 per-row coefficient tensor would promote a bf16 stream to float32.
            delta = coef * vector.to(device).float()
            handles.append(layers[layer - 1].register_forward_hook(_add_hook(delta)))
        yield
    finally:
        for h in handles:
            h.remove()
