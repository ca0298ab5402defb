"""Tests for raysweep.eval.scoring, the scoring kernel: batches and packs, log-probs equal to a
full-logits reference on every path, the shared head step (`label_logprobs`) in its layouts,
with and without gradients, and the architecture's logit post-processing."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_heuristics_logprobs import CONVS, POOLS, PROMPTS, reference

from raysweep.eval import scoring as S
from raysweep.heuristics import logprobs as lp


def test_batches_respect_the_token_budget():
    lengths = [5, 50, 7, 20, 20, 3, 120]
    batches = S.plan_batches(lengths, token_budget=60)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [6]  # longer than the budget: alone, and first
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 60
    capped = S.plan_batches(lengths, token_budget=10**6, max_rows=3)  # generation.token_logprobs' batch_size
    assert capped == [[6, 1, 3], [4, 2, 0], [5]]
    assert S.common_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]], limit=10) == 2
    assert S.common_prefix_len([[1, 2, 3], [1, 2, 3]], limit=1) == 1


def test_packs_respect_the_capacity():
    lengths = [5, 50, 7, 20, 20, 3, 120, 40]
    rows = S.plan_packs(lengths, capacity=60)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert rows[0] == [6]  # longer than a row: alone, and first
    for r in rows[1:]:
        assert sum(lengths[i] for i in r) <= 60
    assert len(rows) == 4  # 120 | 50 3 5 | 40 7 | 20 20: the shortest fill the longest's row
    with pytest.raises(ValueError, match="capacity"):
        S.plan_packs([1], 0)


@pytest.mark.parametrize("share_prefix,budget,pack", [(True, 4096, False), (False, 4096, False), (True, 300, False),
                                                      (True, 1, False), (True, 4096, True), (True, 300, True),
                                                      (False, 300, True), (True, 1, True)])
def test_logprobs_equal_full_logits_reference(tiny, share_prefix, budget, pack):
    model, tok = tiny
    rows = lp.build_rows(PROMPTS, {"train": CONVS}, pools=POOLS)
    _keys, items = lp.encode_rows(tok, rows, "tiny")
    ids, labels = zip(*items.values())
    with pytest.warns(UserWarning, match="pack=True off CUDA") if pack else warnings.catch_warnings():
        if not pack:
            warnings.simplefilter("error")  # padded batches warn about nothing
        fast = S.score_sequences(model, list(ids), list(labels), token_budget=budget, share_prefix=share_prefix,
                                  pack=pack)
    assert model.config._attn_implementation == "sdpa"  # packing switches it only for the call
    ref = reference(model, ids, labels)
    for f, r, lab in zip(fast, ref, labels):
        assert f.dtype == np.float64 and f.shape == r.shape == (sum(y != -100 for y in lab),)
        assert np.abs(f - r).max() < 1e-5
        assert abs(f.sum() - r.sum()) < 1e-5 * len(r)
    assert S.score_sequences(model, [[1, 2, 3]], [[-100, -100, -100]])[0].size == 0
    with pytest.raises(ValueError, match="no context"):
        S.score_sequences(model, [[1, 2]], [[1, 2]])


def test_packed_rows_document_mask():
    """The mask rule of a packed row, as CUDA runs it (flex attention with a BlockMask) and as
    CPU runs it (a dense boolean mask for SDPA): each token attends to the shared prefix and
    its own document's earlier tokens, and both forms give the same attention output."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    docs = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 1, 2, 3, 3])  # prefix of 3, four documents (3 = padding)
    dense = S.packed_mask(docs)[0, 0]
    allowed = {(q, kv) for q in range(11) for kv in range(q + 1)
               if docs[kv] < 0 or docs[kv] == docs[q]}
    assert {(q, kv) for q, kv in zip(*torch.nonzero(dense).T.tolist())} == allowed
    q, k, v = (torch.randn(1, 2, 11, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    block = create_block_mask(S.doc_mask_mod(docs), B=None, H=None, Q_LEN=11, KV_LEN=11, device="cpu")
    flex = flex_attention(q, k, v, block_mask=block)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert torch.allclose(flex, sdpa, atol=1e-6)


def test_packed_and_compiled_decoder(tiny):
    """pack + compile: one row length, so torch.compile builds the decoder once; same numbers."""
    model, tok = tiny
    rows = lp.build_rows(PROMPTS, {"train": CONVS[:3]}, pools=POOLS)
    _keys, items = lp.encode_rows(tok, rows, "tiny")
    ids, labels = (list(x) for x in zip(*items.values()))
    ref = S.score_sequences(model, ids, labels)
    for _ in range(2):  # the second call reuses the compiled decoder
        with pytest.warns(UserWarning, match="meant for CUDA"):
            out = S.score_sequences(model, ids, labels, token_budget=512, pack=True, compile=True)
        assert max(np.abs(a - b).max() for a, b in zip(out, ref)) < 1e-5


# ---------------------------------------------------------------------------------------------
# label_logprobs: the head step every caller shares


def _head(vocab=50, hidden=8, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    return head, torch.randn(40, hidden) * 3, torch.randint(0, vocab, (40,))


def _no_post(x):
    return x


def test_label_logprobs_flat_equals_log_softmax_in_chunks():
    head, h, ys = _head()
    want = torch.log_softmax(head(h).double(), -1).gather(-1, ys[:, None])[:, 0]
    with torch.no_grad():
        for chunk in (1, 7, 1024):
            got = S.label_logprobs(head, _no_post, h, ys, chunk=chunk, buf={})
            assert got.dtype == torch.float32 and got.shape == (40,)
            assert torch.allclose(got.double(), want, atol=1e-5)
        fused = S.label_logprobs(head, _no_post, h, ys, chunk=7, torch_log_softmax=True)
        assert torch.equal(fused, torch.log_softmax(head(h), -1).gather(-1, ys[:, None])[:, 0])
        f64 = S.label_logprobs(head, _no_post, h, ys, dtype=torch.float64)
    assert f64.dtype == torch.float64 and torch.allclose(f64, want, atol=1e-12)
    assert S.label_logprobs(head, _no_post, h[:0], ys[:0]).shape == (0,)


def test_label_logprobs_several_tokens_per_position():
    """[N, K] targets (the local judge's prefix tree): K reads from one row of logits."""
    head, h, _ = _head()
    ys = torch.randint(0, 50, (40, 3))
    with torch.no_grad():
        got = S.label_logprobs(head, _no_post, h, ys, chunk=16, dtype=torch.float64)
    want = torch.log_softmax(head(h).double(), -1).gather(-1, ys)
    assert got.shape == (40, 3) and torch.allclose(got, want, atol=1e-12)


def test_label_logprobs_with_grad_matches_no_grad_and_autograd_reference():
    head, h, ys = _head()
    with torch.no_grad():
        plain = S.label_logprobs(head, _no_post, h, ys, chunk=16)
    x = h.clone().requires_grad_()
    got = S.label_logprobs(head, _no_post, x, ys, chunk=16)
    assert got.requires_grad and torch.equal(got.detach(), plain)  # the same arithmetic, out of place
    (g,) = torch.autograd.grad(got.sum(), [x])
    x2 = h.clone().requires_grad_()
    (want,) = torch.autograd.grad(-F.cross_entropy(head(x2), ys, reduction="sum"), [x2])
    assert torch.allclose(g, want, atol=1e-6)


def test_label_logprobs_sequence_layout_is_the_cross_entropy():
    """[B, T, d] with IGNORE (the mech passes): exactly -cross_entropy over the batch, 0 where unscored."""
    head, _, _ = _head()
    h = torch.randn(3, 6, 8)
    ys = torch.randint(0, 50, (3, 6))
    ys[0, :2] = ys[2, 4:] = S.IGNORE
    x = h.clone().requires_grad_()
    got = S.label_logprobs(head, _no_post, x, ys)
    x2 = h.clone().requires_grad_()
    want = -F.cross_entropy(head(x2).transpose(1, 2), ys, ignore_index=S.IGNORE, reduction="none")
    assert torch.equal(got, want) and (got[ys == S.IGNORE] == 0).all()
    (g,) = torch.autograd.grad(got.sum(), [x])
    (g2,) = torch.autograd.grad(want.sum(), [x2])
    assert torch.equal(g, g2)


@pytest.mark.parametrize("knob", [{"final_logit_softcapping": 3.0}, {"logit_scale": 0.5}, {"logits_scaling": 2.0}])
def test_post_processing_of_the_architecture(knob):
    """Soft-capping (Gemma), scale (Cohere), divisor (Granite): in place without grad, out of place with it."""
    from types import SimpleNamespace

    head, _, _ = _head()
    model = SimpleNamespace(config=SimpleNamespace(**knob), get_decoder=lambda: None,
                            get_output_embeddings=lambda: head)  # what decoder_and_head reads of a model
    _decoder, head, post = S.decoder_and_head(model)
    h, ys = torch.randn(10, 8) * 5, torch.randint(0, 50, (10,))
    logits = head(h).detach()
    if "final_logit_softcapping" in knob:
        logits = torch.tanh(logits / 3.0) * 3.0
    elif "logit_scale" in knob:
        logits = logits * 0.5
    else:
        logits = logits / 2.0
    want = torch.log_softmax(logits, -1).gather(-1, ys[:, None])[:, 0]
    with torch.no_grad():
        assert torch.allclose(S.label_logprobs(head, post, h, ys), want, atol=1e-6)
    x = h.clone().requires_grad_()
    got = S.label_logprobs(head, post, x, ys)
    assert torch.allclose(got.detach(), want, atol=1e-6)
    torch.autograd.grad(got.sum(), [x])  # differentiable: no in-place op on a tensor autograd needs


def test_label_index_and_check_labels():
    labels = [[S.IGNORE, S.IGNORE, 5, 6], [S.IGNORE, S.IGNORE], [S.IGNORE, S.IGNORE, S.IGNORE, 7, 8]]
    rows, cols, ys, counts = S.label_index(labels, offset=1)  # a batch run after one shared token
    assert rows.tolist() == [0, 0, 2, 2] and cols.tolist() == [0, 1, 1, 2] and ys.tolist() == [5, 6, 7, 8]
    assert counts == [2, 0, 2]
    assert [t.numel() for t in S.label_index([[S.IGNORE]])[:3]] == [0, 0, 0]
    with pytest.raises(ValueError, match="first token"):
        S.check_labels([[1, 2]], [[1, 2]])
    with pytest.raises(ValueError, match="labels"):
        S.check_labels([[1, 2]], [[S.IGNORE]])
