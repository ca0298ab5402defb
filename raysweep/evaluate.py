"""The minimal evaluation run at checkpoints: answers to held-out questions under each
condition, their trait scores, and the judge-free held-out trait logprob.

Conditions: `default` = the question alone (the template's default system prompt, no
defensive object); `training` = the trial's own defensive object (same prefix / system
prompt / steering as in training; mix draws a seeded rephrasing per question).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import numpy as np

from .config import ExperimentConfig
from .data import Encoded, question_messages
from .defenses import Defense
from .judges import Scorer


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def condition_conversations(questions: list[str], condition: str, defense: Defense, seed: int):
    base = [question_messages(q) for q in questions]
    if condition == "default":
        return base
    return defense.conversations(base, _seed("eval-draws", seed))


def evaluate_step(
    model, tokenizer, cfg: ExperimentConfig, trial_id: str, step: int, defense: Defense,
    questions: list[str], heldout: list[Encoded], judge: Scorer,
) -> dict[str, list[dict[str, Any]]]:
    """Rows for the completions, scores and heldout_logprob tables at one checkpoint."""
    from .generation import generate, token_logprobs

    e = cfg.eval
    completions, scores = [], []
    for condition in e.conditions:
        convs = condition_conversations(questions, condition, defense, cfg.seed)
        rows = [(qid, s, c) for qid, c in enumerate(convs) for s in range(e.n_samples)]
        hooks = defense.active(model) if condition == "training" else contextlib.nullcontext()
        with hooks:
            # The same seed for every trial and step: samples are paired across trials.
            texts = generate(
                model, tokenizer, [c for _, _, c in rows], max_new_tokens=e.max_new_tokens,
                temperature=e.temperature, top_p=e.top_p, seed=_seed("sample", cfg.seed, condition),
                batch_size=e.batch_size,
            )
        prompts = [c[-1]["content"] if c[-1]["role"] == "user" else "" for _, _, c in rows]
        system = [next((m["content"] for m in c if m["role"] == "system"), None) for _, _, c in rows]
        graded = judge(prompts, texts)
        for (qid, sample, _), prompt, sys_prompt, text, (score, reason) in zip(rows, prompts, system, texts, graded):
            key = {"trial_id": trial_id, "step": step, "condition": condition, "question_id": qid, "sample": sample}
            shown = prompt if sys_prompt is None else f"[system] {sys_prompt}\n{prompt}"
            completions.append({**key, "prompt": shown, "completion": text})
            scores.append({**key, "trait": e.trait, "score": score, "judge": judge.name, "reason": reason})
    heldout_rows = []
    if e.heldout_logprob and heldout:
        lps = token_logprobs(model, [h.input_ids for h in heldout], [h.labels for h in heldout], batch_size=e.batch_size)
        for i, lp in enumerate(lps):
            heldout_rows.append(
                {"trial_id": trial_id, "step": step, "example_id": i,
                 "logprob": float(np.mean(lp)) if len(lp) else float("nan"), "n_tokens": int(len(lp))}
            )
    return {"completions": completions, "scores": scores, "heldout_logprob": heldout_rows}
