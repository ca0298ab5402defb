"""Mechanistic analyses: gradient cosines and losses against manual autograd, uncentred PCA,
IP-vs-PPS similarity, activation projections; rows fit the declared schemas."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from raysweep.data import encode, read_chat
from raysweep.data.conversations import with_prefix
from raysweep.eval.generation import token_logprobs
from raysweep.mech.analyses import (
    coef_groups,
    activation_projection,
    grad_cosine,
    gradient_pca,
    ip_pps_similarity,
    uncentred_pca,
)
from raysweep.mech.passes import Condition, common_suffix, run_pass
from raysweep.train.models import model_layers
from raysweep.tables import SCHEMAS

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Answer in French."


@pytest.fixture(scope="module")
def convs():
    return read_chat(REPO / "datasets" / "french_demo" / "train.jsonl", 3)


def _table(tiny, seed: int) -> torch.Tensor:
    model, _ = tiny
    return torch.randn(len(model_layers(model)) + 1, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _manual_grad(model, tok, conv, layer, steer=None):
    """dL/dh at `layer` (L = summed CE over assistant tokens) and the labels, written out by hand."""
    enc = encode(tok, conv, 512)
    kept = {}

    def add(m, a, o):
        vec, _, coef = steer
        return (o[0] + coef * vec,) + o[1:] if isinstance(o, tuple) else o + coef * vec

    def keep(m, a, o):
        kept["h"] = o[0] if isinstance(o, tuple) else o

    handles = [model_layers(model)[steer[1] - 1].register_forward_hook(add)] if steer else []
    handles.append(model_layers(model)[layer - 1].register_forward_hook(keep))
    try:
        logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    terms = [F.cross_entropy(logits[t - 1][None], torch.tensor([y])) for t, y in enumerate(enc.labels) if t and y != -100]
    return torch.autograd.grad(sum(terms), kept["h"])[0][0], enc.labels


def _manual_cosine(g, labels, v):
    cos = [float(g[t] @ v) / (float(g[t].norm()) * float(v.norm()))
           for t, y in enumerate(labels) if y != -100 and float(g[t].norm()) > 0]
    return sum(cos) / len(cos), len(cos)


def test_grad_cosine_and_loss_match_manual_autograd(tiny, convs):
    model, tok = tiny
    compare = {"a": _table(tiny, 1), "b": _table(tiny, 2)}
    steer_vec = _table(tiny, 3)[1] * 0.5
    conds = [Condition("plain"), Condition("pps", steer=((steer_vec, 1, 4.0),), steer_label="s@1", coef=4.0),
             Condition("ip", prompts=(PROMPT,), ip="french")]
    cos_rows, loss_rows = grad_cosine(model, tok, convs, conds, compare, [1, 2], batch_size=2)
    assert len(cos_rows) == 3 * 3 * 2 * 2 and len(loss_rows) == 3 * 3
    pa.Table.from_pylist(cos_rows, schema=SCHEMAS["mech_grad_cosine"])
    pa.Table.from_pylist(loss_rows, schema=SCHEMAS["mech_loss"])
    got = {(r["condition"], r["sequence_id"], r["layer"], r["vector"]): r for r in cos_rows}
    for i, conv in enumerate(convs):
        for cond, c, steer in (("plain", conv, None), ("pps", conv, (steer_vec, 1, 4.0)),
                               ("ip", with_prefix(conv, PROMPT, "user_prefix"), None)):
            for layer in (1, 2):
                g, labels = _manual_grad(model, tok, c, layer, steer)
                for name in ("a", "b"):
                    want, n = _manual_cosine(g, labels, compare[name][layer])
                    row = got[(cond, i, layer, name)]
                    assert row["n_tokens"] == n
                    assert row["cosine"] == pytest.approx(want, abs=1e-5)
    # The loss is the mean next-token CE over assistant tokens: -mean log p from the generation backend.
    for r in loss_rows:
        conv = convs[r["sequence_id"]]
        if r["condition"] == "ip":
            conv = with_prefix(conv, PROMPT, "user_prefix")
        if r["condition"] == "pps":
            continue
        enc = encode(tok, conv, 512)
        lp = token_logprobs(model, [enc.input_ids], [enc.labels])[0]
        assert r["loss"] == pytest.approx(-lp.mean(), rel=1e-5)
        assert r["n_tokens"] == len(lp)
    # Steering changes the gradient direction (the analysis can tell conditions apart).
    assert got[("pps", 0, 1, "a")]["cosine"] != pytest.approx(got[("plain", 0, 1, "a")]["cosine"], abs=1e-6)


def test_uncentred_pca_of_rank_one_matrix():
    rng = np.random.default_rng(0)
    u = rng.normal(size=32)
    u /= np.linalg.norm(u)
    a = rng.uniform(0.5, 2.0, size=20)  # every sample shifted the same way along u
    g = np.outer(a, u) + 1e-9 * rng.normal(size=(20, 32))
    eig, frac, comps = uncentred_pca(g, orient=-u)  # oriented towards -u: PC1 must be -u
    assert frac[0] == pytest.approx(1.0, abs=1e-9)
    assert comps[0] @ -u == pytest.approx(1.0, abs=1e-9)
    eig, frac, comps = uncentred_pca(g, orient=u + rng.normal(size=32) * 0.1)
    assert comps[0] @ u == pytest.approx(1.0, abs=1e-9)
    # The eigenvalues are those of the uncentred second-moment matrix of the Frobenius-normalised data.
    h = rng.normal(size=(6, 4)) + 3.0
    hn = h / np.linalg.norm(h)
    want = np.sort(np.linalg.eigvalsh(hn.T @ hn / 5))[::-1]
    eig, frac, comps = uncentred_pca(h)
    np.testing.assert_allclose(eig, want, atol=1e-12)
    assert frac.sum() == pytest.approx(1.0)
    # Without centring the common shift dominates: PC1 is the mean direction (centred PCA would miss it).
    m = h.mean(0)
    assert abs(comps[0] @ m / np.linalg.norm(m)) > 0.99
    with pytest.raises(ValueError, match="N >= 2"):
        uncentred_pca(h[:1])


def test_gradient_pca_rows(tiny, convs):
    model, tok = tiny
    refs = {"trait": _table(tiny, 5), "random": _table(tiny, 6)}
    defended = Condition("pps", steer=((refs["trait"][1], 1, 8.0),), steer_label="trait@1", coef=8.0)
    pca, cos, scores = gradient_pca(model, tok, convs, defended, Condition("plain"), [1, 2], refs, "trait",
                                    max_components=2, batch_size=3)
    for name, rows in (("mech_grad_pca", pca), ("mech_grad_pca_cosine", cos), ("mech_grad_pca_scores", scores)):
        pa.Table.from_pylist(rows, schema=SCHEMAS[name])
    assert {r["layer"] for r in pca} == {1, 2} and all(0 < r["explained"] <= 1 for r in pca)
    oriented = [r for r in cos if r["reference"] == "trait" and r["component"] != "mean"]
    assert oriented and all(r["cosine"] >= 0 for r in oriented)
    assert len(scores) == len(pca) * len(convs)


def test_ip_pps_similarity_aligned_positions(tiny, convs):
    model, tok = tiny
    assert common_suffix([1, 2, 3, 4], [9, 3, 4]) == 2 and common_suffix([1], [2]) == 0
    v = _table(tiny, 7)
    # The same forward pass on both sides: cosine 1 on every aligned position.
    same = ip_pps_similarity(model, tok, convs, Condition("plain"), [Condition("none")], [1, 2], batch_size=2)
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-6) for r in same)
    ip = Condition("ip", prompts=(PROMPT,), ip="french")
    steered = [Condition(f"pps@{c}", steer=((v[1], 1, c), (v[2], 2, c)), steer_label="v@all", coef=c) for c in (0.0, 3.0)]
    rows = ip_pps_similarity(model, tok, convs, ip, steered, [1, 2], batch_size=2)
    pa.Table.from_pylist(rows, schema=SCHEMAS["mech_ip_pps_similarity"])
    assert len(rows) == len(convs) * 2 * 2
    for r in rows:
        full = len(encode(tok, convs[r["sequence_id"]], 512).input_ids)
        assert 0 < r["n_tokens"] < full and -1 <= r["cosine"] <= 1
        assert r["cosine"] < 1 - 1e-6  # the prompt changes the gradients after it
    by = {(r["coef"], r["sequence_id"], r["layer"]): r["cosine"] for r in rows}
    assert all(by[(3.0, i, l)] != pytest.approx(by[(0.0, i, l)], abs=1e-6) for i in range(len(convs)) for l in (1, 2))


def test_activation_projection_matches_hidden_states(tiny, convs):
    model, tok = tiny
    v = _table(tiny, 8)
    rows = activation_projection(model, tok, convs, {"t": v}, [1], batch_size=2)
    pa.Table.from_pylist(rows, schema=SCHEMAS["mech_projection"])
    for r in rows:
        enc = encode(tok, convs[r["sequence_id"]], 512)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states[1][0]
        mask = torch.tensor(enc.labels) != -100
        want = float((hs[mask] @ (v[1] / v[1].norm())).mean())
        assert r["projection"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_intensity_sweep_runs_in_one_batched_pass(tiny, convs):
    """Conditions that differ only in their coefficient run as one pass (each sequence copied
    once per coefficient, a per-row coefficient) and give the numbers of separate passes."""
    model, tok = tiny
    compare = {"a": _table(tiny, 1)}
    vec = _table(tiny, 3)[1] * 0.5
    sweep = [Condition(f"pps@{c:g}", steer=((vec, 1, c),), steer_label="s@1", coef=c) for c in (0.5, 1.5, 4.0)]
    plain = Condition("plain")
    assert [len(g) for g in coef_groups([plain, *sweep])] == [1, 3]
    other = Condition("other", steer=((vec * 2, 1, 1.0),), steer_label="s2@1", coef=1.0)
    assert [len(g) for g in coef_groups([*sweep, other])] == [3, 1]  # another vector: its own pass

    calls = []
    # A pass runs the decoder (the scoring kernel applies the LM head): count its forwards.
    hook = model.get_decoder().register_forward_hook(lambda m, a, o: calls.append(a))
    try:
        cos_b, loss_b = grad_cosine(model, tok, convs, sweep, compare, [1, 2], batch_size=9)
        passes_batched = len(calls)
        calls.clear()
        separate = [grad_cosine(model, tok, convs, [c], compare, [1, 2], batch_size=9) for c in sweep]
        passes_separate = len(calls)
    finally:
        hook.remove()
    assert (passes_batched, passes_separate) == (1, 3)  # 3 sequences x 3 coefficients in one 9-row pass
    cos_s = [r for c, _ in separate for r in c]
    loss_s = [r for _, l in separate for r in l]
    assert [(r["condition"], r["sequence_id"], r["layer"]) for r in cos_b] == [
        (r["condition"], r["sequence_id"], r["layer"]) for r in cos_s]
    for a, b in zip(cos_b + loss_b, cos_s + loss_s):
        key = "cosine" if "cosine" in a else "loss"
        assert a[key] == pytest.approx(b[key], abs=1e-5) and a["coef"] == b["coef"]
    with pytest.raises(ValueError, match="differ only in their steering coefficients"):
        list(run_pass(model, tok, [encode(tok, convs[0], 512)], [plain, sweep[0]], [1]))


def test_gradient_pca_keeps_components_up_to_the_threshold_uncapped_by_default():
    """Seed 001 App. F.2: every component up to 95% cumulative explained variance; a cap only
    when asked (mech.pca_max_components, 0 = none)."""
    import numpy as np

    from raysweep.mech.analyses import _n_kept
    from raysweep.mech.config import MechConfig

    fractions = np.array([0.3, 0.2] + [0.05] * 10)  # 95% is reached at the 11th component
    assert _n_kept(fractions, 0.95, MechConfig().pca_max_components) == 11
    assert _n_kept(fractions, 0.95, 3) == 3
    assert _n_kept(fractions, 0.5, 0) == 2
