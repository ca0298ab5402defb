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
log-probs (float64). `BACKENDS` holds the transformers one (the scoring kernel,
`eval.scoring.score_sequences`) and the vLLM one (prompt_logprobs through ray.data.llm);
they agree within 1e-4 per token in fp32. The transformers backend
runs in-process (`score_plain`) or inside a Ray Data actor pool (`score_ray`) with the same
numbers; the vLLM backend is a Ray Data job of its own, started from the driver.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Messages, assistant_spans
from ..data.conversations import prompt_texts, with_prompts
from ..eval.scoring import IGNORE, score_sequences

VARIANTS = ("default", "fixed", "mix")

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
# Backends: the transformers one (the scoring kernel, eval/scoring.py) and the vLLM one


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
