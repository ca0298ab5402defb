"""The scoring kernel: the log-probability of each labelled token of (input_ids, labels) sequences.

labels[t] is the token at position t, predicted from positions < t; -100 (`IGNORE`) marks a
token that is not scored. Every per-token log-prob computed with transformers goes through
here (vLLM's prompt_logprobs, eval/engine.py, is the other backend):

- `decoder_and_head(model)`: the decoder stack, the LM head and the architecture's logit
  post-processing, so a caller can run the body itself (mech: with hooks and gradients;
  the local judge: a prefix tree over a KV cache) and still share the head step.
- `label_logprobs(head, post, h, ys)`: that head step, log p(y) from hidden states. Scored
  positions only ([N, d]), `chunk` at a time, as logit[y] - logsumexp(logits): in place in
  one reused float32 buffer without gradients, differentiable with them; several tokens
  per position for the local judge's prefix tree. Or whole sequences ([B, T, d]): one
  cross-entropy over the batch, the mech passes' losses and their gradients.
- `score_sequences(model, input_ids, labels)`: the batched no-grad scorer around it:
  token-budget batches longest first (`plan_batches`), the batch's common prefix run once
  through a shared KV cache (`shared_prefix_len`), the LM head at labelled positions
  (`label_index`); or (`pack`) sequences packed into rows with a document mask
  (`plan_packs`, `packed_mask`: flex attention on CUDA), optionally through torch.compile.
  The heuristics pass (`heuristics.logprobs`) and held-out evaluation
  (`generation.token_logprobs`) call it.

The module imports nothing from raysweep, so every stage can import it.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager

import numpy as np

IGNORE = -100  # label of tokens that are not scored
FLEX_BLOCK = 128  # flex attention's mask block size: packed rows are a multiple of it


def check_labels(input_ids: list[list[int]], labels: list[list[int]]) -> None:
    """Raise ValueError unless every sequence has one label per token and its first is unlabelled."""
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} sequences but {len(labels)} label lists")
    for n, (ids, lab) in enumerate(zip(input_ids, labels)):
        if len(ids) != len(lab):
            raise ValueError(f"sequence {n}: {len(ids)} tokens but {len(lab)} labels")
        if lab and lab[0] != IGNORE:
            raise ValueError(f"sequence {n}: the first token has no context to be predicted from")


def label_index(labels: list[list[int]], *, offset: int = 0, device=None):
    """Where a batch's labelled tokens are predicted: (rows, cols, ys, counts).

    rows, cols, ys: long tensors, sequence by sequence and in order; the output at
    [rows, cols] (position t - 1 - `offset` of the row, for a batch run after `offset`
    shared tokens) predicts token ys. counts: labelled tokens per sequence.
    """
    import torch

    found = [[(r, t - 1 - offset, y) for t, y in enumerate(lab) if y != IGNORE] for r, lab in enumerate(labels)]
    flat = torch.tensor([x for f in found for x in f], dtype=torch.long).reshape(-1, 3).to(device)
    rows, cols, ys = flat.unbind(1)
    return rows, cols, ys, [len(f) for f in found]


# ---------------------------------------------------------------------------------------------
# Planning: token-budget batches, packed rows, shared prefixes


def plan_batches(lengths: list[int], token_budget: int, max_rows: int = 0) -> list[list[int]]:
    """Indices grouped longest first so that len(batch) * longest <= token_budget.

    A sequence longer than the budget gets a batch of its own; `max_rows` > 0 also caps the
    rows of a batch.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= token_budget \
                and not 0 < max_rows <= len(batches[-1]):
            batches[-1].append(i)  # the batch's first index is its longest
        else:
            batches.append([i])
    return batches


def plan_packs(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens in all, for packing.

    Longest first; each row takes the longest sequence left, then the shortest ones while
    they fit. A sequence longer than `capacity` gets a row of its own.
    """
    if capacity < 1:
        raise ValueError(f"pack capacity must be >= 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    lo, hi = 0, len(order) - 1
    while lo <= hi:
        row, size = [order[lo]], lengths[order[lo]]
        lo += 1
        while lo <= hi and size + lengths[order[hi]] <= capacity:
            row.append(order[hi])
            size += lengths[order[hi]]
            hi -= 1
        rows.append(row)
    return rows


def common_prefix_len(seqs: list[list[int]], limit: int) -> int:
    """Length of the longest token prefix shared by every sequence, at most `limit`."""
    n = min(limit, *(len(s) for s in seqs))
    first = seqs[0]
    for p in range(n):
        t = first[p]
        if any(s[p] != t for s in seqs):
            return p
    return n


def shared_prefix_len(seqs: list[list[int]], labs: list[list[int]]) -> int:
    """Tokens at the head of every sequence that predict no label, worth running once (0 if < 4).

    Bounded by the first position that predicts a labelled token, so every scored position
    lies after the shared prefix.
    """
    if len(seqs) < 2:
        return 0
    first = min(next(t for t, y in enumerate(lab) if y != IGNORE) for lab in labs)
    shared = common_prefix_len(seqs, limit=first - 1)
    return shared if shared >= 4 else 0


# ---------------------------------------------------------------------------------------------
# The LM head at scored positions


def decoder_and_head(model):
    """(decoder stack, LM head module, logit post-processing of the architecture).

    `post(x)` applies what the model's forward does to the head's output (Cohere multiplies
    the logits, Granite divides them, Gemma 2/3 soft-cap them): in place on a tensor that
    needs no gradient, out of place on one that does. PEFT-wrapped models are unwrapped
    (their adapter layers live inside the base model's modules).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(cfg, "logit_scale", None)
    divide = getattr(cfg, "logits_scaling", None)
    cap = getattr(cfg, "final_logit_softcapping", None)

    def post(x):
        if x.requires_grad:
            if scale:
                x = x * scale
            if divide:
                x = x / divide
            return (x / cap).tanh() * cap if cap else x
        if scale:
            x.mul_(scale)
        if divide:
            x.div_(divide)
        if cap:
            x.div_(cap).tanh_().mul_(cap)
        return x

    return base.get_decoder(), base.get_output_embeddings(), post


def label_logprobs(head, post, h, ys, *, chunk: int = 1024, buf: dict | None = None, dtype=None,
                   torch_log_softmax: bool = False):
    """log p(y) = log_softmax(logits)[y] from hidden states, the LM head applied here.

    Logits are `post(head(h))` (`decoder_and_head`: the architecture's own post-processing)
    in `dtype` (float32 by default; the local judge asks for float64); the result is in
    `dtype` on h's device. Two layouts:

    - scored positions: h [N, d] with ys [N] (returns [N]) or [N, K] (K tokens read from
      each position's logits; returns [N, K]). Only these N positions reach the head,
      `chunk` at a time, as logit[y] - logsumexp(logits). Without gradients a float32
      linear head writes into one reused buffer (`buf`, kept by the caller across calls)
      and the log-sum-exp runs in place: on CPU a fresh vocabulary-wide tensor per chunk
      costs as much as the matmul (page faults). When h requires grad the same arithmetic
      runs out of place and is differentiable (the max a constant shift, as in logsumexp).
      `torch_log_softmax`: read y from torch.log_softmax(logits) instead, torch's fused
      kernel. It rounds differently (and, on CPU, less accurately: up to 1.4e-5 per token on
      SmolLM2's 49k vocabulary against 1.5e-6 for the in-place form); held-out evaluation
      keeps it so that its recorded numbers stay bit for bit (tests/test_golden.py).
    - sequences: h [B, T, d] with ys [B, T], h[b, t] predicting ys[b, t] and IGNORE where
      nothing is scored (returns [B, T], 0 there): one cross-entropy over the batch, with
      gradients when h requires them. The mech passes' losses: their gradient cosines are
      recorded (tests/test_golden.py) to the last bits of this kernel's backward, which
      depend on the memory layout, so this layout keeps them.
    """
    import torch

    dtype = dtype or torch.float32
    if h.dim() == 3:
        import torch.nn.functional as F

        lg = post(head(h).to(dtype))
        return -F.cross_entropy(lg.transpose(1, 2), ys, ignore_index=IGNORE, reduction="none")
    if not len(ys):
        return torch.zeros(ys.shape, dtype=dtype, device=h.device)
    grad = torch.is_grad_enabled() and h.requires_grad
    buf = {} if buf is None else buf
    fast = not grad and dtype == torch.float32 and isinstance(head, torch.nn.Linear) \
        and head.weight.dtype == torch.float32
    cols = ys[:, None] if ys.dim() == 1 else ys
    out = []
    for c in range(0, len(ys), chunk):
        hc, yc = h[c : c + chunk], cols[c : c + chunk]
        if fast:
            if "logits" not in buf:
                buf["logits"] = torch.empty((chunk, head.weight.shape[0]), dtype=torch.float32, device=h.device)
            lg = buf["logits"][: len(yc)]
            torch.mm(hc, head.weight.t(), out=lg)
            if head.bias is not None:
                lg.add_(head.bias)
        else:
            lg = head(hc).to(dtype)
        lg = post(lg)
        if torch_log_softmax:
            out.append(torch.log_softmax(lg, dim=-1).gather(-1, yc))
            continue
        target = lg.gather(-1, yc)
        top = lg.detach().amax(dim=-1, keepdim=True)
        shifted = (lg - top).exp() if grad else lg.sub_(top).exp_()
        out.append(target - (top[:, 0] + shifted.sum(dim=-1).log())[:, None])
    return torch.cat(out).view(ys.shape)


# ---------------------------------------------------------------------------------------------
# The batched scorer: padded token-budget batches or packed rows


def _score_batch(decoder, head, post, seqs, labs, *, head_chunk: int, share_prefix: bool, device, buf: dict,
                 torch_log_softmax: bool):
    import torch

    # Positions [0, shared) are the same tokens in every row and predict no label: computed once.
    shared = shared_prefix_len(seqs, labs) if share_prefix else 0
    width = max(len(s) for s in seqs)
    # Right padding needs no attention mask: causal attention never looks at later positions.
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    if shared:
        cache = decoder(input_ids=ids[:1, :shared], use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(seqs))
        hidden = decoder(input_ids=ids[:, shared:], past_key_values=cache, use_cache=True).last_hidden_state
        del cache
    else:
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    rows, cols, ys, counts = label_index(labs, offset=shared, device=device)
    h = hidden[rows, cols]  # only the positions that predict a labelled token reach the LM head
    del hidden
    out = label_logprobs(head, post, h, ys, chunk=head_chunk, buf=buf, torch_log_softmax=torch_log_softmax)
    return list(torch.split(out.double().cpu(), counts))


def doc_mask_mod(docs):
    """Flex-attention mask_mod of a packed row: causal, and a token sees the shared prefix
    (document -1) and its own document; `docs` is the document of each position."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & ((docs[kv] < 0) | (docs[q] == docs[kv]))

    return mask_mod


def packed_mask(docs):
    """The attention mask of a packed row for the model's forward.

    CUDA: a flex-attention BlockMask (the model runs flex attention, a fused kernel that
    skips masked blocks). CPU: the same rule as a dense [1, 1, L, L] boolean mask for SDPA,
    because inductor's CPU flex-attention template fails to build for some row lengths.
    """
    import torch

    mask_mod = doc_mask_mod(docs)
    width = len(docs)
    if docs.device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=width, KV_LEN=width, device=docs.device)
    idx = torch.arange(width, device=docs.device)
    return mask_mod(0, 0, idx[:, None], idx[None, :])[None, None]


def _score_packed(decoder, head, post, seqs, labs, *, shared: int, length: int, head_chunk: int, device,
                  buf: dict, torch_log_softmax: bool):
    """Score `seqs` packed into one row: [shared prefix][doc 0][doc 1]...[padding].

    Each document keeps the position ids it has alone and sees only the shared prefix and
    its own earlier tokens (`packed_mask`; padding sees only padding), so its log-probs
    are those of its own forward.
    """
    import torch

    ids, pos, doc, where, ys = list(seqs[0][:shared]), list(range(shared)), [-1] * shared, [], []
    for d, (s, lab) in enumerate(zip(seqs, labs)):
        start = len(ids) - shared  # packed index of the document's position p >= shared: start + p
        ids += s[shared:]
        pos += range(shared, len(s))
        doc += [d] * (len(s) - shared)
        for t, y in enumerate(lab):
            if y != IGNORE:  # position t - 1 (>= shared) predicts token t
                where.append(start + t - 1)
                ys.append(y)
    width = -(-max(length, len(ids)) // FLEX_BLOCK) * FLEX_BLOCK  # whole mask blocks: one shape per row length
    pad = width - len(ids)
    ids += [0] * pad
    pos += range(pad)
    doc += [len(seqs)] * pad
    mask = packed_mask(torch.tensor(doc, device=device))
    hidden = decoder(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([pos], device=device),
                     attention_mask=mask, use_cache=False).last_hidden_state[0]
    h = hidden[torch.tensor(where, device=device)]
    del hidden, mask
    out = label_logprobs(head, post, h, torch.tensor(ys, device=device), chunk=head_chunk, buf=buf,
                         torch_log_softmax=torch_log_softmax)
    return list(torch.split(out.double().cpu(), [sum(y != IGNORE for y in lab) for lab in labs]))


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> its torch.compile'd module


def _compiled(decoder):
    import torch

    if decoder not in _COMPILED:
        _COMPILED[decoder] = torch.compile(decoder)
    return _COMPILED[decoder]


@contextmanager
def _attention(model, implementation: str | None):
    """Switch the model's attention implementation for the duration (None or the current one: leave it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    if implementation is None or implementation == before:
        yield
        return
    try:
        base.set_attn_implementation(implementation)
    except (ValueError, ImportError) as e:
        raise ValueError(f"pack=True on CUDA needs flex attention, which {type(base).__name__} does not "
                         f"support here: {e}") from e
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def score_sequences(
    model,
    input_ids: list[list[int]],
    labels: list[list[int]],
    *,
    token_budget: int = 4096,
    head_chunk: int = 1024,
    share_prefix: bool = True,
    pack: bool = False,
    compile: bool = False,
    max_rows: int = 0,
    torch_log_softmax: bool = False,
) -> list[np.ndarray]:
    """Log-probability (float64) of each token whose label != -100, in order, per sequence.

    labels[t] is the token at position t, predicted from positions < t. Sequences are
    grouped longest first into batches of at most `token_budget` padded tokens; a batch's
    common token prefix (the chat template's system block, at least) is run once and its
    KV cache shared by the rows (`share_prefix`); only the hidden states that predict a
    labelled token go through the LM head, `head_chunk` positions at a time, and the
    log-softmax is logit[y] - logsumexp(logits) in float32, in place in a reused buffer
    (`label_logprobs`).

    `pack`: instead, sequences are packed without padding into rows of `token_budget`
    tokens (the prefix common to all of them once per row) and attend through a document
    mask (`packed_mask`: flex attention on CUDA, a dense mask for SDPA on CPU); every row
    has the same length, so `compile` (the decoder through torch.compile) compiles once.
    Meant for CUDA; on CPU it is exact but slower than padded batches (bench/NOTES.md).

    `max_rows` > 0 caps the rows of a padded batch; `torch_log_softmax`: see `label_logprobs`.
    """
    import torch

    check_labels(input_ids, labels)
    result = [np.zeros(0, dtype=np.float64) for _ in input_ids]
    todo = [i for i, lab in enumerate(labels) if any(y != IGNORE for y in lab)]
    if not todo:
        return result
    decoder, head, post = decoder_and_head(model)
    forward = _compiled(decoder) if compile else decoder
    device = next(model.parameters()).device
    buf: dict = {}  # the LM head's logits buffer, reused by every batch
    flex = pack and device.type == "cuda"
    if pack and not flex:
        warnings.warn("pack=True off CUDA is exact but slower than padded batches (a dense document mask, "
                      "nothing skipped); it is meant for CUDA (bench/NOTES.md)", stacklevel=2)
    with torch.inference_mode(), _attention(model, "flex_attention" if flex else "sdpa" if pack else None):
        if pack:
            seqs = [input_ids[i] for i in todo]
            shared = shared_prefix_len(seqs, [labels[i] for i in todo]) if share_prefix else 0
            groups = plan_packs([len(s) - shared for s in seqs], max(1, token_budget - shared))
        else:
            groups = plan_batches([len(input_ids[i]) for i in todo], token_budget, max_rows)
        for group in groups:
            idx = [todo[b] for b in group]
            seqs, labs = [input_ids[i] for i in idx], [labels[i] for i in idx]
            if pack:
                lps = _score_packed(forward, head, post, seqs, labs, shared=shared, length=token_budget,
                                    head_chunk=head_chunk, device=device, buf=buf, torch_log_softmax=torch_log_softmax)
            else:
                lps = _score_batch(forward, head, post, seqs, labs, head_chunk=head_chunk, share_prefix=share_prefix,
                                   device=device, buf=buf, torch_log_softmax=torch_log_softmax)
            for i, lp in zip(idx, lps):
                result[i] = lp.numpy()
    return result
