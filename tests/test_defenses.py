"""PPS hook arithmetic and vector loading."""

import pytest
import torch
from safetensors.torch import save_file

from raysweep.config import ConfigError, SteerConfig
from raysweep.defenses import load_vector, steer
from raysweep.models import model_layers


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
