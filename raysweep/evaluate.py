"""The minimal evaluation run at checkpoints: answers to held-out questions under each
condition, their trait scores, and the judge-free held-out trait logprob.

Conditions: `default` = the question alone (the template's default system prompt, no
defensive object); `training` = the trial's own defensive object (same prefix / system
prompt / steering as in training; mix draws a seeded rephrasing per question).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ExperimentConfig
from .data import Encoded, question_messages
from .defenses import Defense
from .judges import Scorer


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def _memo(cache: Path | None, key: Any, compute: Callable[[], Any]) -> Any:
    """Content-addressed JSON memo: the base model's answers are the same for every trial."""
    if cache is None:
        return compute()
    from .tables import write_json

    path = cache / (hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        return json.loads(path.read_text())["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def condition_conversations(questions: list[str], condition: str, defense: Defense, seed: int):
    base = [question_messages(q) for q in questions]
    if condition == "default":
        return base
    return defense.conversations(base, _seed("eval-draws", seed))


def evaluate_step(
    model, tokenizer, cfg: ExperimentConfig, trial_id: str, step: int, defense: Defense,
    questions: list[str], heldout: list[Encoded], judge: Scorer, cache: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Rows for the completions, scores and heldout_logprob tables at one checkpoint.

    At step 0 the adapter is the identity (LoRA B = 0), so answers and held-out logprobs
    are the base model's: with `cache`, each distinct set of messages (and steering) is
    computed once per experiment and shared by every trial.
    """
    from .generation import generate, token_logprobs

    e = cfg.eval
    base = {"model": cfg.model, "eval": e, "seed": cfg.seed}
    completions, scores = [], []
    for condition in e.conditions:
        convs = condition_conversations(questions, condition, defense, cfg.seed)
        rows = [(qid, s, c) for qid, c in enumerate(convs) for s in range(e.n_samples)]
        hooks = defense.active(model) if condition == "training" else contextlib.nullcontext()
        with hooks:
            # The same seed for every trial and step: samples are paired across trials.
            def sample() -> list[str]:
                return generate(
                    model, tokenizer, [c for _, _, c in rows], max_new_tokens=e.max_new_tokens,
                    temperature=e.temperature, top_p=e.top_p, seed=_seed("sample", cfg.seed, condition),
                    batch_size=e.batch_size,
                )

            # Step 0 is the base model: the answers depend only on the messages (and steering).
            steering = cfg.defense.pps if condition == "training" else []
            key = {**base, "generate": [c for _, _, c in rows], "steering": steering}
            texts = _memo(cache if step == 0 else None, key, sample)
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
        def logprobs() -> list[list[float]]:
            ids, labels = [h.input_ids for h in heldout], [h.labels for h in heldout]
            return [lp.tolist() for lp in token_logprobs(model, ids, labels, batch_size=e.batch_size)]

        lps = _memo(cache if step == 0 else None, {**base, "heldout": [h.input_ids for h in heldout]}, logprobs)
        for i, lp in enumerate(lps):
            heldout_rows.append(
                {"trial_id": trial_id, "step": step, "example_id": i,
                 "logprob": float(np.mean(lp)) if len(lp) else float("nan"), "n_tokens": int(len(lp))}
            )
    return {"completions": completions, "scores": scores, "heldout_logprob": heldout_rows}
