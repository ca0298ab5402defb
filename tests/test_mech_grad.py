"""Gradient manipulation (001 App. E.2): exact per-token formulas, removal, config wiring."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raysweep.config import (
    ConfigError,
    DefenseConfig,
    GradConfig,
    load_config,
    trial_id,
)
from raysweep.data import encode, read_chat
from raysweep.train.grad import gradient_manipulation, load_grad_vectors, manipulate
from raysweep.train.models import model_layers
from raysweep.train.step import Collator, micro_loss
from test_defenses import layer_hooks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch(tiny):
    _, tok = tiny
    convs = read_chat(REPO / "datasets" / "french_demo" / "train.jsonl", 3)
    return Collator(tok.pad_token_id)([encode(tok, c, 48) for c in convs])


def _unit(seed: int, d: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _expected(g: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    """The manipulated gradient written out token by token with Python scalars."""
    out = torch.empty_like(g)
    for b in range(g.shape[0]):
        for t in range(g.shape[1]):
            s = float(g[b, t] @ v)
            p = s * v
            out[b, t] = {"attenuate": g[b, t] - p + abs(s) * v, "amplify": g[b, t] - p - abs(s) * v,
                         "neutralize": g[b, t] - p}[mode]
    return out


def _plain_graph(model, batch, layer: int):
    """(loss, output of `layer`) of a plain forward pass, the output kept for autograd."""
    captured = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = model_layers(model)[layer - 1].register_forward_hook(hook)
    try:
        loss, _ = micro_loss(model, batch)
    finally:
        handle.remove()
    return loss, captured["h"]


@pytest.mark.parametrize("mode", ["attenuate", "amplify", "neutralize"])
@pytest.mark.parametrize("layer", [1, 2])
def test_modes_match_manual_projection_token_by_token(tiny, batch, mode, layer):
    model, _ = tiny
    params = [p for p in model.parameters()]
    v = _unit(layer, model.config.hidden_size)
    # Expected: the plain graph's parameter gradients, with the manually manipulated gradient
    # injected at the layer output and the rest of the loss's gradient flowing around it.
    loss, h = _plain_graph(model, batch, layer)
    g = torch.autograd.grad(loss, h, retain_graph=True)[0]
    g_hat = _expected(g, v, mode)
    # d loss/d theta = (direct part not through h) + VJP(h, g); replacing g by g_hat changes the second part.
    full = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    through_g = torch.autograd.grad(h, params, grad_outputs=g, retain_graph=True, allow_unused=True)
    through_hat = torch.autograd.grad(h, params, grad_outputs=g_hat, allow_unused=True)
    zero = lambda t, p: torch.zeros_like(p) if t is None else t
    expected = [zero(f, p) - zero(a, p) + zero(b, p) for f, a, b, p in zip(full, through_g, through_hat, params)]

    model.zero_grad(set_to_none=True)
    with gradient_manipulation(model, {layer: v * 3.0}, mode):  # any norm: v is unit-normalised inside
        micro_loss(model, batch)[0].backward()
    got = [zero(p.grad, p) for p in params]
    model.zero_grad(set_to_none=True)
    changed = sum(not torch.equal(e, f) for e, f in zip(expected, full))
    assert changed > 0  # the manipulation does change gradients upstream of the layer
    for e, gt in zip(expected, got):
        torch.testing.assert_close(gt, e, rtol=1e-4, atol=1e-6)
    s_after = (g_hat * v).sum(-1)
    if mode == "attenuate":
        assert (s_after >= -1e-6).all() and ((g * v).sum(-1) < 0).any()
    elif mode == "amplify":
        assert (s_after <= 1e-6).all()
    else:
        assert s_after.abs().max() < 1e-5


def test_manipulate_formula_on_a_hand_example():
    v = torch.tensor([1.0, 0.0])
    g = torch.tensor([[-2.0, 5.0], [3.0, 1.0]])
    assert torch.equal(manipulate(g, v, "attenuate"), torch.tensor([[2.0, 5.0], [3.0, 1.0]]))
    assert torch.equal(manipulate(g, v, "amplify"), torch.tensor([[-2.0, 5.0], [-3.0, 1.0]]))
    assert torch.equal(manipulate(g, v, "neutralize"), torch.tensor([[0.0, 5.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="attenuate"):
        manipulate(g, v, "flip")


def test_removed_hook_leaves_gradients_bit_identical(tiny, batch):
    model, _ = tiny

    def grads():
        model.zero_grad(set_to_none=True)
        micro_loss(model, batch)[0].backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    hooks = layer_hooks(model)
    plain = grads()
    vecs = {1: _unit(0, model.config.hidden_size), 2: _unit(1, model.config.hidden_size)}
    with gradient_manipulation(model, vecs, "attenuate"):
        inside = grads()
    after = grads()
    with gradient_manipulation(model, vecs, "none"):
        off = grads()
    assert any(not torch.equal(a, b) for a, b in zip(plain, inside))
    assert all(torch.equal(a, b) for a, b in zip(plain, after))
    assert all(torch.equal(a, b) for a, b in zip(plain, off))
    assert layer_hooks(model) == hooks


def test_vectors_from_a_file_and_config_validation(tiny, tmp_path):
    model, _ = tiny
    d = model.config.hidden_size
    table = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    save_file({"v": table}, str(tmp_path / "v.safetensors"))
    vecs = load_grad_vectors(GradConfig(mode="amplify", vector=str(tmp_path / "v.safetensors")), model)
    assert sorted(vecs) == [1, 2] and torch.equal(vecs[2], table[2])
    assert sorted(load_grad_vectors(GradConfig(mode="amplify", vector=str(tmp_path / "v.safetensors"), layers=[2]), model)) == [2]
    with pytest.raises(ConfigError, match="defense.grad.*not found"):
        load_grad_vectors(GradConfig(mode="amplify", vector=str(tmp_path / "missing.pt")), model)
    with pytest.raises(ConfigError, match="defense.grad.mode"):
        load_config("demo", ["defense.grad.mode=flip"])
    with pytest.raises(ConfigError, match="needs defense.grad.vector"):
        load_config("demo", ["defense.grad.mode=attenuate"])
    cfg = load_config("demo", ["defense.grad.mode=attenuate", f"defense.grad.vector={tmp_path / 'v.safetensors'}"])
    assert cfg.defense.grad.mode == "attenuate"
    # An unused manipulation does not change trial ids; a used one does.
    base = load_config("demo")
    assert trial_id(base) != trial_id(cfg)
    from dataclasses import replace

    assert trial_id(replace(base, defense=DefenseConfig(grad=GradConfig()))) == trial_id(base)


@pytest.mark.integration
def test_trial_trains_under_the_manipulation_with_ip(tmp_path):
    """defense.grad composes with ip: same first-step loss (the forward pass is unchanged),
    different later losses (the updates are), and the trial label names the manipulation."""
    import polars as pl
    from test_trial import tiny_config

    from raysweep.config import IPConfig
    from raysweep.sweep.expand import label
    from raysweep.train.trial import run_trial

    vec = tmp_path / "v.safetensors"
    save_file({"v": torch.randn(3, 64, generator=torch.Generator().manual_seed(2))}, str(vec))
    ip = DefenseConfig(kind="ip", ip=IPConfig(prompt="fr", text="Answer in French."))
    cfgs = {"ip": tiny_config(ip),
            "ip_amplify": tiny_config(DefenseConfig(kind="ip", ip=ip.ip, grad=GradConfig(mode="amplify", vector=str(vec))))}
    for name, cfg in cfgs.items():
        from dataclasses import replace

        run_trial(replace(cfg, train=replace(cfg.train, max_steps=3), eval=replace(cfg.eval, steps=[0])), tmp_path, name)
    losses = {n: pl.read_parquet(tmp_path / "trials" / n / "losses.parquet")["loss"].to_list() for n in cfgs}
    assert losses["ip"][0] == losses["ip_amplify"][0]
    assert losses["ip"][2] != pytest.approx(losses["ip_amplify"][2], rel=1e-6)
    assert label(cfgs["ip_amplify"]) == "fr/fixed+grad:amplify:v"
