"""The one work list of a checkpoint's evaluation, its row type, and its seeding rule.

A row (`Request`) is a chat to answer (`messages`) or a token sequence to score (`input_ids`
+ `labels`), the PEFT adapter to apply ("" = the base model), and sampling settings; a
`Result` is the reply text of a generation row or the per-token log-probabilities
(float64) of a scoring one. `work_list` gives every row of one (trial, checkpoint): per
condition, question and sample a generation row, then per held-out completion a scoring
row, each as a `WorkItem` (where the answer goes). The in-trial evaluation
(evaluate.evaluate_step, `run_on_model` on the model being trained) and the post-sweep one
(posteval.py, an engine.Engine) both run this list.

Seeding rule. A condition's rows are one sampling group (`Request.group`), numbered in
(question, sample) order (`Request.index`) and seeded `sample_seed(seed, condition)`: the
trial's seed and the condition alone, so samples are paired across trials and checkpoints.
The transformers backend answers a group in one generation.generate call, rows in index
order, `batch_size` (eval.batch_size) at a time, batch b drawing from
generation.row_seed(S, b); vLLM (engine.VLLMEngine) gives row k its own generator seeded
row_seed(S, k). So the same trial gets the same answers on the same backend whichever path
runs it; the two samplers draw differently, so sampled answers differ between backends
(config.identity: the backend is then part of the trial id). Greedy answers do not depend
on the seed, and agree between the backends.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..config.schema import ExperimentConfig
from ..data import Encoded
from ..data.conversations import condition_conversations
from ..train.defenses import Defense, make_defense
from .generation import generate, token_logprobs
from .scoring import check_labels

HELDOUT = "heldout"  # the work list's name for the held-out scoring rows (never a condition's)


def _seed(*parts: Any) -> int:
    """A 32-bit seed named by its parts."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Request:
    """One row: answer `messages`, or score `input_ids` where `labels` != -100.

    A generation row of a sampling group (`group` != "") is answered as the module docstring
    says; rows without a group are grouped by their settings alone, and on vLLM each keeps
    `seed` itself. `batch_size` (0 = the engine's) is the transformers backend's: its
    sampled answers depend on which rows share a batch.
    """

    messages: list[dict] | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None
    adapter: str = ""  # PEFT adapter directory; "" = the base model
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # the sampling group's seed
    group: str = ""  # sampling group: rows answered together under one seed
    index: int = 0  # the row's place in its group
    batch_size: int = 0  # rows per transformers batch (0 = the engine's)

    @property
    def scores(self) -> bool:
        return self.labels is not None


@dataclass
class Result:
    text: str = ""  # reply of a generation request
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per labelled token, of a scoring request


def check_requests(requests: Sequence[Request]) -> None:
    """Raise ValueError for a request that is neither a chat nor a labelled token sequence."""
    for n, r in enumerate(requests):
        if r.scores == (r.messages is not None) or r.scores != (r.input_ids is not None):
            raise ValueError(f"request {n}: give messages (generate) or input_ids + labels (score), not both")
        if r.temperature < 0:
            raise ValueError(f"request {n}: temperature must be >= 0, got {r.temperature}")
        if r.batch_size < 0:
            raise ValueError(f"request {n}: batch_size must be >= 0 (0 = the engine's), got {r.batch_size}")
    seen: set[tuple] = set()
    for n, r in enumerate(requests):
        key = (r.adapter, r.group, r.seed, r.index)
        if r.group and not r.scores and key in seen:
            raise ValueError(f"request {n}: two rows of sampling group {r.group!r} at index {r.index}")
        seen.add(key)
    scoring = [r for r in requests if r.scores]
    check_labels([r.input_ids for r in scoring], [r.labels for r in scoring])


def sample_seed(seed: int, condition: str) -> int:
    """The seed of a condition's sampling group: the trial's seed and the condition alone."""
    return _seed("sample", seed, condition)


@dataclass(frozen=True)
class WorkItem:
    """One row of a checkpoint's work list: what is asked (`request`) and where its answer goes."""

    condition: str  # an eval condition, or HELDOUT for a held-out scoring row
    question_id: int  # index into the questions (HELDOUT: into the held-out completions)
    sample: int  # 0..eval.n_samples-1 (HELDOUT: 0)
    request: Request


def work_list(
    cfg: ExperimentConfig, questions: Sequence[str], heldout: Sequence[Encoded] = (), *,
    defense: Defense | None = None, adapter: str = "",
) -> list[WorkItem]:
    """Every request of one (trial, checkpoint): generation rows by condition, then held-out scoring rows.

    `adapter` is the checkpoint's PEFT directory ("" = the model as loaded: in-trial, or step 0);
    `defense` the trial's (default: built from cfg.defense). The seeding rule is the module
    docstring's. Held-out rows come only with eval.heldout_logprob.
    """
    e = cfg.eval
    defense = defense if defense is not None else make_defense(cfg.defense)
    items = []
    for condition in e.conditions:
        convs = condition_conversations(list(questions), condition, defense, cfg.seed, cfg)
        rows = [(qid, s, c) for qid, c in enumerate(convs) for s in range(e.n_samples)]
        seed = sample_seed(cfg.seed, condition)
        settings = dict(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=seed,
                        batch_size=e.batch_size)
        # The group is named by its content: identical groups (step 0 of trials asking the same
        # thing) are one group, different ones never share a generate call.
        digest = hashlib.sha256(json.dumps([settings, [c for _, _, c in rows]], sort_keys=True).encode())
        group = f"{condition}@{digest.hexdigest()[:16]}"
        items += [WorkItem(condition, qid, s, Request(messages=c, adapter=adapter, group=group, index=k, **settings))
                  for k, (qid, s, c) in enumerate(rows)]
    if e.heldout_logprob:
        items += [WorkItem(HELDOUT, i, 0, Request(input_ids=list(h.input_ids), labels=list(h.labels), adapter=adapter,
                                                  batch_size=e.batch_size))
                  for i, h in enumerate(heldout)]
    return items


def by_name(items: Sequence[WorkItem]) -> dict[str, list[WorkItem]]:
    """The work list split by condition (and HELDOUT), in order."""
    out: dict[str, list[WorkItem]] = {}
    for item in items:
        out.setdefault(item.condition, []).append(item)
    return out


def run_on_model(model, tokenizer, requests: Sequence[Request], batch_size: int = 16) -> list[Result]:
    """Results in request order, on a loaded (possibly PEFT-wrapped, possibly hooked) model.

    The transformers side of the sampling rule (module docstring): each sampling group is one
    generation.generate call, rows in index order, seeded with the group's seed. Rows without
    a group are grouped by their settings (greedy rows ignore the seed: one call for all).
    `batch_size` serves requests that do not set their own. The in-trial evaluation calls
    this on the model it trains; TransformersEngine on each adapter it loads.
    """
    check_requests(requests)
    results = [Result() for _ in requests]
    scoring: dict[int, list[int]] = {}
    groups: dict[tuple, list[int]] = {}
    for k, r in enumerate(requests):
        size = r.batch_size or batch_size
        if r.scores:
            scoring.setdefault(size, []).append(k)
        else:
            seed = r.seed if r.temperature > 0 or r.group else 0
            groups.setdefault((r.group, seed, r.max_new_tokens, r.temperature, r.top_p, size), []).append(k)
    for size, ks in scoring.items():
        lps = token_logprobs(model, [requests[k].input_ids for k in ks], [requests[k].labels for k in ks],
                             batch_size=size)
        for k, lp in zip(ks, lps):
            results[k].logprobs = lp
    for (group, seed, max_new, temperature, top_p, size), ks in groups.items():
        if group:
            ks = sorted(ks, key=lambda k: requests[k].index)
        texts = generate(model, tokenizer, [requests[k].messages for k in ks], max_new_tokens=max_new,
                         temperature=temperature, top_p=top_p, seed=seed, batch_size=size)
        for k, text in zip(ks, texts):
            results[k].text = text
    return results
