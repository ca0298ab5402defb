"""PPS hook arithmetic and vector loading."""

import pytest
import torch
from safetensors.torch import save_file

from raysweep.config import ConfigError, SteerConfig
from raysweep.train.defenses import load_vector, steer
from raysweep.train.models import model_layers


def layer_outputs(model, ids):
    outs = []
    hooks = [l.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
             for l in model_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def layer_hooks(model) -> list[set[int]]:
    """Ids of the forward hooks on each decoder layer. Compared before / after rather than
    expected empty: transformers installs recorder hooks of its own the first time a test
    asks the shared model for hidden states."""
    return [set(l._forward_hooks) for l in model_layers(model)]


def test_steering_adds_coef_v_at_the_chosen_layer_only(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.encode("Hello there, how are you today?")])
    hidden = model.config.hidden_size
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    hooks = layer_hooks(model)
    plain = layer_outputs(model, ids)

    # Layer 1's output is recorded before later hooks run; steering at layer 1 changes it
    # by exactly coef * v at every position.
    captured = []
    h = model_layers(model)[0].register_forward_hook(
        lambda m, a, o: captured.append((o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with steer(model, [(v, 1, -2.5)]):
            steered = layer_outputs(model, ids)
    finally:
        h.remove()
    assert torch.equal(captured[0], plain[0])  # the hook sees the unsteered output
    assert torch.equal(steered[0], plain[0] + (-2.5) * v)  # layer-1 output as the model uses it
    # Steering at the last layer leaves the earlier layer untouched.
    with steer(model, [(v, 2, 4.0)]):
        late = layer_outputs(model, ids)
    assert torch.equal(late[0], plain[0])
    assert torch.equal(late[1], plain[1] + 4.0 * v)
    # Several triples compose; after the context exits, hooks are gone and weights identical.
    with steer(model, [(v, 1, 1.0), (v, 2, 1.0)]):
        pass
    assert layer_hooks(model) == hooks
    after = layer_outputs(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(after, plain))
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_vector_files_and_shapes(tiny, tmp_path):
    model, _ = tiny
    n, hidden = len(model_layers(model)), model.config.hidden_size
    full = torch.arange((n + 1) * hidden, dtype=torch.float32).reshape(n + 1, hidden)
    save_file({"v": full}, tmp_path / "v.safetensors")
    got = load_vector(SteerConfig(vector=str(tmp_path / "v.safetensors"), layer=2, coef=1.0), model)
    assert torch.equal(got, full[2])  # index 0 = embeddings, persona_vectors' convention
    torch.save(full[1], tmp_path / "one.pt")
    assert torch.equal(load_vector(SteerConfig(vector=str(tmp_path / "one.pt"), layer=1), model), full[1])

    save_file({"v": torch.zeros(n + 1, hidden + 3)}, tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match=r"wide.safetensors: vector of shape \(3, 67\) does not match"):
        load_vector(SteerConfig(vector=str(tmp_path / "wide.safetensors"), layer=1), model)
    torch.save(torch.zeros(hidden * 2), tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="hidden size 64"):
        load_vector(SteerConfig(vector=str(tmp_path / "bad.pt"), layer=1), model)
    with pytest.raises(ConfigError, match="layer 9 is outside"):
        load_vector(SteerConfig(vector=str(tmp_path / "one.pt"), layer=9), model)


class _Decoder(torch.nn.Module):
    """Just enough of a decoder for `steer`: model.layers, bf16 layers with parameters."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])


class _TupleLinear(torch.nn.Linear):
    def forward(self, x):
        return (super().forward(x), None)  # decoder layers of some models return (hidden, ...)


@pytest.mark.parametrize("layer_cls", [torch.nn.Linear, _TupleLinear])
def test_per_row_coefficients_keep_a_bf16_stream_bf16(layer_cls):
    """A float32 [batch, 1, 1] coefficient tensor (mech's batched intensity sweep) must not promote a
    bf16 layer output to float32 (the next bf16 layer then fails: "expected m1 and m2 to have the
    same dtype"). coef * v is formed in float32 and rounded once to the stream's dtype."""
    gen = torch.Generator().manual_seed(0)
    layer = layer_cls(8, 8, dtype=torch.bfloat16)
    model = _Decoder(layer)
    x = torch.randn(3, 5, 8, generator=gen).to(torch.bfloat16)
    v = torch.randn(8, generator=gen)  # float32, as load_vector returns
    coefs = torch.tensor([0.5, 1.5, 4.0]).view(-1, 1, 1)
    first = lambda o: o[0] if isinstance(o, tuple) else o
    with torch.no_grad():
        plain = first(layer(x))
        with steer(model, [(v, 1, coefs)]):
            out = layer(x)
        with steer(model, [(v, 1, 1.5)]):
            one = first(layer(x))
    assert isinstance(out, tuple) == (layer_cls is _TupleLinear)
    out = first(out)
    assert out.dtype == torch.bfloat16 and one.dtype == torch.bfloat16
    assert torch.equal(out, plain + (coefs * v).to(torch.bfloat16))
    assert torch.equal(one, plain + (1.5 * v).to(torch.bfloat16))
    assert torch.equal(out[1], one[1])  # a row's coefficient acts as the same float coefficient
