"""Training-time gradient manipulation (001 Appendix E.2): a context manager over hooks.

A forward hook on each chosen decoder layer registers a tensor hook on the layer's output, so
in the backward pass each token's gradient g there becomes, with v unit-normalised,
s = g.v and p = s v:

  attenuate   g - p + |s| v   (component along v forced >= 0)
  amplify     g - p - |s| v   (component along v forced <= 0)
  neutralize  g - p           (component along v removed)

The modified gradient then flows on through the block's attention and MLP (and earlier layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

MODES = ("none", "attenuate", "amplify", "neutralize")


def manipulate(g, v, mode: str):
    """The manipulated gradient for per-token gradients g [..., d] and a unit vector v [d]."""
    s = (g * v).sum(-1, keepdim=True)
    rest = g - s * v
    if mode == "attenuate":
        return rest + s.abs() * v
    if mode == "amplify":
        return rest - s.abs() * v
    if mode == "neutralize":
        return rest
    raise ValueError(f"gradient manipulation mode must be one of {', '.join(MODES[1:])}, got {mode!r}")


def _forward_hook(v, mode: str):
    def tensor_hook(grad):
        return manipulate(grad.float(), v, mode).to(grad.dtype)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.requires_grad:  # no-op under inference_mode / no_grad (e.g. generation)
            h.register_hook(tensor_hook)

    return hook


@contextlib.contextmanager
def gradient_manipulation(model, vectors: dict[int, object], mode: str) -> Iterator[None]:
    """Manipulate the gradient at the output of each layer in `vectors` (layer -> [hidden] vector)."""
    from .models import model_layers

    if mode == "none" or not vectors:
        yield
        return
    layers = model_layers(model)
    handles = []
    try:
        for layer, vec in vectors.items():
            device = next(layers[layer - 1].parameters()).device
            unit = (vec.float() / vec.float().norm()).to(device)
            handles.append(layers[layer - 1].register_forward_hook(_forward_hook(unit, mode)))
        yield
    finally:
        for h in handles:
            h.remove()


def load_grad_vectors(cfg, model) -> dict[int, object]:
    """layer -> [hidden] vector for `defense.grad` (every decoder layer when `layers` is empty)."""
    from ..errors import ConfigError
    from ..config.schema import SteerConfig
    from .defenses import read_vector
    from .models import model_layers

    n = len(model_layers(model))
    hidden = model.config.get_text_config().hidden_size
    out = {}
    for layer in list(cfg.layers) or range(1, n + 1):
        try:
            vec = read_vector(SteerConfig(vector=cfg.vector, layer=layer, key=cfg.key), n, hidden)
        except ConfigError as exc:
            raise ConfigError(f"defense.grad: {exc}") from None
        if not float(vec.norm()) > 0:
            raise ConfigError(f"defense.grad: {cfg.vector} is zero at layer {layer}; it has no direction")
        out[layer] = vec
    return out
