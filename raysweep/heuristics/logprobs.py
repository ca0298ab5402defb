"""The logprob pass: log-probability of each completion under the default, fixed and mix prefixes.

A row is (prompt_key, variant, set, example_id, messages); its completion is the last
assistant message, scored given everything before it. Variants:

- `default`: the conversation as stored (the template's default system prompt applies). It
  does not depend on the prompt, so it is one row per example with prompt_key "" and is
  shared by every prompt.
- `fixed`: the prompt text placed by `data.with_prefix` (user_prefix or system placement).
- `mix`: example k of a set gets `pool[k % len(pool)]`, the prompt's k-th rephrasing in
  file order: seed 003's index-matched convention (Exp 12, `lp_train_mix`), so a mix row
  is a pure function of (pool file, k) and the same k always sees the same rephrasing.

Every row is tokenised once; identical token sequences (same model, same ids and labels)
are scored once, by content hash, within a pass and, through the optional cache, across
runs. Scoring goes through a backend: a function (input_ids, labels) -> per-token
log-probs (float64). `BACKENDS` holds the transformers one and the vLLM one (prompt_logprobs
through ray.data.llm); they agree within 1e-4 per token in fp32. The transformers backend
runs in-process (`score_plain`) or inside a Ray Data actor pool (`score_ray`) with the same
numbers; the vLLM backend is a Ray Data job of its own, started from the driver.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Messages, assistant_spans
from ..data.conversations import prompt_texts, with_prompts
from ..eval.generation import check_labels

IGNORE = -100  # label of tokens that are not scored
VARIANTS = ("default", "fixed", "mix")
FLEX_BLOCK = 128  # flex attention's mask block size: packed rows are a multiple of it

# (input_ids, labels) per sequence -> log-prob (float64) of each labelled token, in order.
Scorer = Callable[[list[list[int]], list[list[int]]], list[np.ndarray]]
Items = dict[str, tuple[list[int], list[int]]]  # content key -> (input_ids, labels)


# ---------------------------------------------------------------------------------------------
# Rows and tokens


def build_rows(
    prompts: dict[str, str],
    sets: dict[str, list[Messages]],
    *,
    pools: dict[str, list[str]] | None = None,
    placement: str = "user_prefix",
    variants: tuple[str, ...] | list[str] = ("fixed", "mix"),
) -> list[dict[str, Any]]:
    """Rows of the pass: one default row per example, then every (prompt, variant, example)."""
    if set(variants) - {"fixed", "mix"}:
        raise ValueError(f"unknown variants {sorted(set(variants) - {'fixed', 'mix'})} (fixed | mix; default is always included)")
    rows = [
        {"prompt_key": "", "variant": "default", "set": s, "example_id": k, "messages": conv}
        for s, convs in sets.items()
        for k, conv in enumerate(convs)
    ]
    for key, text in prompts.items():
        for v in variants:
            pool = (pools or {}).get(key) if v == "mix" else None
            if v == "mix" and not pool:
                raise ValueError(f"mix variant of {key!r} needs a non-empty rephrasing pool")
            for s, convs in sets.items():
                # fixed: the prompt; mix: the k-th rephrasing for example k (Exp 12, index-matched)
                texts = prompt_texts("fixed", len(convs), [text]) if v == "fixed" else prompt_texts("indexed", len(convs), pool)
                for k, messages in enumerate(with_prompts(convs, texts, placement)):
                    rows.append({"prompt_key": key, "variant": v, "set": s, "example_id": k, "messages": messages})
    return rows


def encode_completion(tokenizer, messages: Messages, max_len: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation; labels only on the last assistant answer.

    The span is `data.assistant_spans`' (the end-of-turn token is scored, as in training).
    `max_len` > 0 truncates the sequence (and so the completion) to that many tokens.
    """
    text, spans = assistant_spans(tokenizer, messages)
    start, end = spans[-1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if start <= a < end else IGNORE for t, (a, _b) in zip(ids, enc["offset_mapping"])]
    if max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def content_key(model_id: str, input_ids: list[int], labels: list[int]) -> str:
    """Content hash of one scoring problem: the same key always has the same answer."""
    blob = json.dumps([model_id, input_ids, labels], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def encode_rows(tokenizer, rows: list[dict[str, Any]], model_id: str, max_len: int = 0) -> tuple[list[str], Items]:
    """(content key per row, the unique scoring problems by key)."""
    keys, items, seen = [], {}, {}
    for r in rows:
        # Rows with identical messages (e.g. a pool containing the prompt itself) tokenise once.
        msg_key = json.dumps(r["messages"], sort_keys=True, ensure_ascii=False)
        if msg_key not in seen:
            ids, labels = encode_completion(tokenizer, r["messages"], max_len)
            key = content_key(model_id, ids, labels)
            seen[msg_key] = key
            items.setdefault(key, (ids, labels))
        keys.append(seen[msg_key])
    return keys, items


# ---------------------------------------------------------------------------------------------
# The transformers backend: token-budget batches, shared prefixes, LM head on needed positions


def plan_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped longest first so that len(batch) * longest <= token_budget.

    A sequence longer than the budget gets a batch of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= token_budget:
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


def _decoder_and_head(model):
    """(decoder stack, LM head module, in-place logit post-processing of the architecture)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies the logits
    divide = getattr(cfg, "logits_scaling", None)  # Granite divides them
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3 soft-cap them

    def post(x):
        if scale:
            x.mul_(scale)
        if divide:
            x.div_(divide)
        if cap:
            x.div_(cap).tanh_().mul_(cap)
        return x

    return base.get_decoder(), base.get_output_embeddings(), post


def _head_logprobs(head, post, h, ys, chunk: int, buf: dict):
    """log p(y) = logit[y] - logsumexp(logits) in float32, `chunk` positions at a time.

    A float32 linear head writes into one reused buffer and the log-sum-exp runs in place:
    on CPU a fresh vocabulary-wide tensor per chunk costs as much as the matmul (page faults).
    """
    import torch

    out = torch.empty(len(ys), dtype=torch.float64)
    fast = isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32
    for c in range(0, len(ys), chunk):
        hc, yc = h[c : c + chunk], ys[c : c + chunk]
        if fast:
            if "logits" not in buf:
                buf["logits"] = torch.empty((chunk, head.weight.shape[0]), dtype=torch.float32, device=h.device)
            lg = buf["logits"][: len(yc)]
            torch.mm(hc, head.weight.t(), out=lg)
            if head.bias is not None:
                lg.add_(head.bias)
        else:
            lg = head(hc).float()
        post(lg)
        target = lg.gather(-1, yc[:, None])[:, 0]
        top = lg.amax(dim=-1, keepdim=True)
        lse = top[:, 0] + lg.sub_(top).exp_().sum(dim=-1).log()
        out[c : c + len(yc)] = (target - lse).double().cpu()
    return out


def _score_batch(decoder, head, post, seqs, labs, *, head_chunk: int, share_prefix: bool, device, buf: dict):
    import torch

    targets = [[(t - 1, y) for t, y in enumerate(lab) if y != IGNORE] for lab in labs]
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
    rows = torch.tensor([r for r, tg in enumerate(targets) for _ in tg], device=device)
    cols = torch.tensor([p - shared for tg in targets for p, _ in tg], device=device)
    ys = torch.tensor([y for tg in targets for _, y in tg], device=device)
    h = hidden[rows, cols]  # only the positions that predict a labelled token reach the LM head
    del hidden
    out = _head_logprobs(head, post, h, ys, head_chunk, buf)
    return list(torch.split(out, [len(tg) for tg in targets]))


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
                  buf: dict):
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
    out = _head_logprobs(head, post, h, torch.tensor(ys, device=device), head_chunk, buf)
    return list(torch.split(out, [sum(y != IGNORE for y in lab) for lab in labs]))


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
) -> list[np.ndarray]:
    """Log-probability (float64) of each token whose label != -100, in order, per sequence.

    labels[t] is the token at position t, predicted from positions < t. Sequences are
    grouped longest first into batches of at most `token_budget` padded tokens; a batch's
    common token prefix (the chat template's system block, at least) is run once and its
    KV cache shared by the rows (`share_prefix`); only the hidden states that predict a
    labelled token go through the LM head, `head_chunk` positions at a time, and the
    log-softmax is logit[y] - logsumexp(logits) in float32, in place in a reused buffer.

    `pack`: instead, sequences are packed without padding into rows of `token_budget`
    tokens (the prefix common to all of them once per row) and attend through a document
    mask (`packed_mask`: flex attention on CUDA, a dense mask for SDPA on CPU); every row
    has the same length, so `compile` (the decoder through torch.compile) compiles once.
    Meant for CUDA; on CPU it is exact but slower than padded batches (bench/NOTES.md).
    """
    import torch

    check_labels(input_ids, labels)
    result = [np.zeros(0, dtype=np.float64) for _ in input_ids]
    todo = [i for i, lab in enumerate(labels) if any(y != IGNORE for y in lab)]
    if not todo:
        return result
    decoder, head, post = _decoder_and_head(model)
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
            groups = plan_batches([len(input_ids[i]) for i in todo], token_budget)
        for group in groups:
            idx = [todo[b] for b in group]
            seqs, labs = [input_ids[i] for i in idx], [labels[i] for i in idx]
            if pack:
                lps = _score_packed(forward, head, post, seqs, labs, shared=shared, length=token_budget,
                                    head_chunk=head_chunk, device=device, buf=buf)
            else:
                lps = _score_batch(forward, head, post, seqs, labs, head_chunk=head_chunk,
                                   share_prefix=share_prefix, device=device, buf=buf)
            for i, lp in zip(idx, lps):
                result[i] = lp.numpy()
    return result


def transformers_backend(
    model_name: str,
    dtype: str = "float32",
    device: str = "cpu",
    token_budget: int = 4096,
    head_chunk: int = 1024,
    share_prefix: bool = True,
    pack: bool = False,
    compile: bool = False,
) -> Scorer:
    """Load the model once; return a scorer that runs `score_sequences` on it (device "auto": cuda if present)."""
    import torch

    from ..train.models import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _tokenizer = load_model(model_name, dtype=dtype, device=device)

    def scorer(input_ids: list[list[int]], labels: list[list[int]]) -> list[np.ndarray]:
        return score_sequences(model, input_ids, labels, token_budget=token_budget, head_chunk=head_chunk,
                               share_prefix=share_prefix, pack=pack, compile=compile)

    return scorer


def vllm_backend(model_name: str, dtype: str = "float32", device: str = "cpu", **_transformers_options) -> Scorer:
    """vLLM's prompt_logprobs through ray.data.llm (raysweep.eval.engine.VLLMEngine).

    Each call is one Ray Data job with one engine (it needs a running Ray); the token-budget
    options of the transformers backend do not apply: vLLM schedules its own batches.
    """
    import torch

    from ..eval.engine import Request, VLLMEngine

    gpus = 1 if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else 0
    engine = VLLMEngine(model_name, dtype, num_gpus=gpus)

    def scorer(input_ids: list[list[int]], labels: list[list[int]]) -> list[np.ndarray]:
        results = engine.run([Request(input_ids=list(i), labels=list(y)) for i, y in zip(input_ids, labels)])
        return [r.logprobs for r in results]

    return scorer


# name -> factory(model_name, dtype, device, **options) -> Scorer
BACKENDS: dict[str, Callable[..., Scorer]] = {"transformers": transformers_backend, "vllm": vllm_backend}


def make_scorer(backend: str, **kwargs) -> Scorer:
    if backend not in BACKENDS:
        raise ValueError(f"unknown logprob backend {backend!r}; registered: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](**kwargs)


# ---------------------------------------------------------------------------------------------
# Running a pass: in-process or as a Ray Data job


def score_plain(items: Items, scorer: Scorer) -> dict[str, np.ndarray]:
    """Score every item in this process."""
    keys = list(items)
    lps = scorer([items[k][0] for k in keys], [items[k][1] for k in keys])
    return dict(zip(keys, lps))


class LogprobActor:
    """Ray Data actor: builds the backend once, then scores batches of (key, input_ids, labels)."""

    def __init__(self, backend: str, backend_kwargs: dict[str, Any], threads: int = 0):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.scorer = make_scorer(backend, **backend_kwargs)

    def __call__(self, batch):
        import pyarrow as pa

        lps = self.scorer(batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist())
        return pa.table({"key": batch.column("key"),
                         "token_logprobs": pa.array([lp.tolist() for lp in lps], type=pa.list_(pa.float64()))})


def score_ray(
    items: Items,
    *,
    backend: str,
    backend_kwargs: dict[str, Any],
    concurrency: int = 1,
    batch_rows: int = 256,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> dict[str, np.ndarray]:
    """Score every item with a Ray Data job: a pool of `concurrency` actors, each loading the model once.

    Items go in longest first, so each actor call receives sequences of similar length and
    packs them into token-budget batches itself. Needs a running Ray (`ray.init()`).
    """
    from ..sweep.ray_runner import map_with_actor_pool

    if not items:
        return {}
    keys = sorted(items, key=lambda k: -len(items[k][0]))
    table = map_with_actor_pool(
        [{"key": k, "input_ids": items[k][0], "labels": items[k][1]} for k in keys], LogprobActor,
        {"backend": backend, "backend_kwargs": backend_kwargs, "threads": max(1, int(num_cpus))},
        concurrency=concurrency, batch_rows=batch_rows, num_cpus=num_cpus, num_gpus=num_gpus)
    lps = table.column("token_logprobs").to_pylist()
    return {k: np.asarray(v, dtype=np.float64) for k, v in zip(table.column("key").to_pylist(), lps)}


def run_pass(keys: list[str], items: Items, score: Callable[[Items], dict[str, np.ndarray]],
             cache: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Per-token log-probs of each row: items missing from `cache` are scored once (and added to it)."""
    cache = {} if cache is None else cache
    todo = {k: v for k, v in items.items() if k not in cache}
    if todo:
        cache.update(score(todo))
    return [cache[k] for k in keys]


def load_cache(path: str | Path) -> dict[str, np.ndarray]:
    """The content-hashed logprob cache (key -> per-token log-probs); empty when absent."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        return {}
    t = pq.read_table(str(path))
    return {k: np.asarray(v, dtype=np.float64)
            for k, v in zip(t.column("key").to_pylist(), t.column("token_logprobs").to_pylist())}


def save_cache(path: str | Path, cache: dict[str, np.ndarray]) -> None:
    import pyarrow as pa

    from ..tables import write_table

    write_table(path, pa.table({"key": pa.array(list(cache), pa.string()),
                                "token_logprobs": pa.array([v.tolist() for v in cache.values()],
                                                           pa.list_(pa.float64()))}))


# ---------------------------------------------------------------------------------------------
# Self-perplexity of the prompt strings (seed 003's selfperplexity heuristics)


def selfperp_sequences(tokenizer, text: str, placement: str = "user_prefix") -> dict[str, tuple[list[int], list[int]]]:
    """(ids, labels) of the two self-perplexity problems of one prompt.

    raw: the prompt tokenised alone (with the tokenizer's own special tokens); every token
    with context is scored (all of them when the tokenizer adds a BOS, else all but the first).
    context: the prompt as the user turn (or the system prompt, for system placement) of
    the chat template, so it is conditioned on the template's system block and role header;
    only the tokens that start inside the prompt's characters are scored.
    """
    raw = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    role = "system" if placement == "system" else "user"
    rendered = tokenizer.apply_chat_template([{"role": role, "content": text}], tokenize=False)
    start = rendered.rfind(text)
    if start <= 0:
        raise ValueError(f"cannot locate the prompt {text!r} in its rendered chat template")
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if start <= a < start + len(text) else IGNORE for t, (a, _b) in zip(ids, enc["offset_mapping"])]
    return {"raw": (raw, [IGNORE] + raw[1:]), "context": (ids, labels)}


# ---------------------------------------------------------------------------------------------
# Tables


def _schemas():
    import pyarrow as pa

    keys = [("prompt_key", pa.string()), ("variant", pa.string()), ("set", pa.string()), ("example_id", pa.int64())]
    return {
        "logprobs": pa.schema(keys + [("logprob", pa.float64()), ("n_tokens", pa.int64()),
                                      ("mean_logprob", pa.float64())]),
        "token_logprobs": pa.schema(keys + [("token_logprobs", pa.list_(pa.float64()))]),
        "selfperp": pa.schema([("prompt_key", pa.string()), ("kind", pa.string()),
                               ("nll_per_token", pa.float64()), ("n_tokens", pa.int64())]),
    }


def schema(name: str):
    """Declared Arrow schema of `logprobs`, `token_logprobs` or `selfperp` (docs/heuristics.md)."""
    return _schemas()[name]


def logprob_tables(rows: list[dict[str, Any]], token_lps: list[np.ndarray]):
    """(logprobs, token_logprobs) Arrow tables of a pass, one row per input row."""
    import pyarrow as pa

    base = {c: [r[c] for r in rows] for c in ("prompt_key", "variant", "set", "example_id")}
    sums = [float(lp.sum()) for lp in token_lps]
    counts = [int(lp.size) for lp in token_lps]
    means = [s / n if n else float("nan") for s, n in zip(sums, counts)]
    logprobs = pa.table({**base, "logprob": sums, "n_tokens": counts, "mean_logprob": means},
                        schema=schema("logprobs"))
    tokens = pa.table({**base, "token_logprobs": [lp.tolist() for lp in token_lps]}, schema=schema("token_logprobs"))
    return logprobs, tokens


def selfperp_table(prompt_keys: list[str], kinds: list[str], token_lps: list[np.ndarray]):
    """Self-perplexity rows: NLL per scored token (NaN when no token was scored)."""
    import pyarrow as pa

    nll = [float(-lp.mean()) if lp.size else float("nan") for lp in token_lps]
    return pa.table({"prompt_key": prompt_keys, "kind": kinds, "nll_per_token": nll,
                     "n_tokens": [int(lp.size) for lp in token_lps]}, schema=schema("selfperp"))
