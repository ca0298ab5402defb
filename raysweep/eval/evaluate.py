"""The minimal evaluation run at checkpoints: answers to held-out questions under each
condition, their trait scores, and the judge-free held-out trait logprob.

Conditions (eval.conditions):
- `default`: the question alone, so the chat template's default system prompt applies;
- `training`: the trial's own defensive object (same prefix / system prompt / steering as
  in training; mix draws a seeded rephrasing per question);
- `added_back`: a prompt added at eval time to every trial, controls included
  (conditionalization): eval.added_back, else the trial's own inoculation prompt (for mix,
  the prompt itself, not a rephrasing), placed per eval.added_back_placement;
- `reinjected`: the question alone with steering added at eval time through forward
  hooks: eval.reinject, else the trial's own defense.pps;
- `system:<text>`: the question alone under the system prompt <text> (whitespace around
  it stripped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np

from ..errors import ConfigError
from ..config.identity import vector_key
from ..config.schema import ExperimentConfig, SteerConfig
from ..data import Encoded, Messages
from ..data.conversations import condition_conversations
from ..train.defenses import Defense, load_vector, steer
from .judges import Scorer


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def _memo(cache: Path | None, key: Any, compute: Callable[[], Any]) -> Any:
    """Content-addressed JSON memo: the base model's answers are the same for every trial."""
    if cache is None:
        return compute()
    from ..tables import write_json

    path = cache / (hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        return json.loads(path.read_text())["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def condition_steering(condition: str, cfg: ExperimentConfig) -> list[SteerConfig]:
    """The steering vectors on under `condition` (empty: no hooks from steering)."""
    if condition == "training":
        return list(cfg.defense.pps)
    if condition == "reinjected":
        if not (cfg.eval.reinject or cfg.defense.pps):
            raise ConfigError("reinjected: this trial has no defense.pps; set eval.reinject")
        return list(cfg.eval.reinject or cfg.defense.pps)
    return []


def steering_key(condition: str, cfg: ExperimentConfig) -> list[SteerConfig]:
    """condition_steering as the step-0 answer memo names it: each vector file by its path and
    content (config.vector_key), so a vector re-extracted to the same path gets new answers."""
    return [replace(s, vector=vector_key(s.vector)) for s in condition_steering(condition, cfg)]


def condition_hooks(condition: str, cfg: ExperimentConfig, defense: Defense, model) -> ContextManager[None]:
    """Forward hooks on while answering under `condition` (a no-op context for prompt-only ones).

    `training` is the trial's own defense (whatever hooks it has); `reinjected` adds
    condition_steering's vectors through defenses.steer.
    """
    if condition == "training":
        return defense.active(model)
    steering = condition_steering(condition, cfg)
    if not steering:
        return contextlib.nullcontext()
    return steer(model, [(load_vector(s, model), s.layer, s.coef) for s in steering])


def score_rows(
    keys: list[dict[str, Any]], prompts: list[str], answers: list[str], judges: dict[str, Scorer],
) -> list[dict[str, Any]]:
    """`scores` rows: one per (answer, trait), with the judge's name, the prompt it was sent,
    its raw reply and the reason when unscored. `keys` hold each answer's identifying columns;
    `prompts` are the questions the judge sees (judge_questions: the bare question)."""
    rows = []
    for trait, judge in judges.items():
        for key, g in zip(keys, judge.grade(prompts, answers), strict=True):
            rows.append({**key, "trait": trait, "score": g.score, "judge": judge.name, "reason": g.reason,
                         "judge_prompt": g.judge_prompt, "raw": g.raw})
    return rows


def evaluate_step(
    model, tokenizer, cfg: ExperimentConfig, trial_id: str, step: int, defense: Defense,
    questions: list[str], heldout: list[Encoded], judges: dict[str, Scorer] | Scorer, cache: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Rows for the completions, scores and heldout_logprob tables at one checkpoint.

    `judges` maps trait -> scorer (judges.make_judges: eval.trait, plus coherence and
    alignment when eval.em is on); a single scorer scores eval.trait.

    At step 0 the adapter is the identity (LoRA B = 0), so answers and held-out logprobs
    are the base model's: with `cache`, each distinct set of messages (and steering) is
    computed once per experiment and shared by every trial.
    """
    from .generation import generate, token_logprobs

    e = cfg.eval
    judges = judges if isinstance(judges, dict) else {e.trait: judges}
    base = {"model": cfg.model, "eval": e, "seed": cfg.seed}
    if cfg.model.start:  # a starting model: named by its recipe or its adapter's content
        from ..config.identity import start_key

        base["start"] = start_key(cfg), cfg.starts
    completions, scores = [], []
    for condition in e.conditions:
        convs = condition_conversations(questions, condition, defense, cfg.seed, cfg)
        rows = [(qid, s, c) for qid, c in enumerate(convs) for s in range(e.n_samples)]
        with condition_hooks(condition, cfg, defense, model):
            # The same seed for every trial and step: samples are paired across trials.
            def sample() -> list[str]:
                return generate(
                    model, tokenizer, [c for _, _, c in rows], max_new_tokens=e.max_new_tokens,
                    temperature=e.temperature, top_p=e.top_p, seed=_seed("sample", cfg.seed, condition),
                    batch_size=e.batch_size,
                )

            # Step 0 is the base model: the answers depend only on the messages (and steering).
            key = {**base, "generate": [c for _, _, c in rows], "steering": steering_key(condition, cfg)}
            texts = _memo(cache if step == 0 else None, key, sample)
        c_rows, s_rows = answer_rows(trial_id, step, condition, rows, texts, judges, questions)
        completions.extend(c_rows)
        scores.extend(s_rows)
    heldout_rows = []
    if e.heldout_logprob and heldout:
        def logprobs() -> list[list[float]]:
            ids, labels = [h.input_ids for h in heldout], [h.labels for h in heldout]
            return [lp.tolist() for lp in token_logprobs(model, ids, labels, batch_size=e.batch_size)]

        lps = _memo(cache if step == 0 else None, {**base, "heldout": [h.input_ids for h in heldout]}, logprobs)
        heldout_rows = heldout_logprob_rows(trial_id, step, lps)
    return {"completions": completions, "scores": scores, "heldout_logprob": heldout_rows}


def judge_questions(questions: list[str], rows: list[tuple[int, int, Messages]]) -> list[str]:
    """The question the judge is sent with each answer in `rows` = (question id, sample, messages).

    It is the evaluation question as asked in the default condition (the raw text from the
    questions file), under every condition: the judge never sees an inoculation prompt, an
    added_back text or a system prompt, so all conditions are judged on the same question
    (seed 003: the judge receives the evaluation instruction alone). The single place both
    the in-trial and the post-sweep (posteval.py) evaluation build the judge's question.
    """
    return [questions[qid] for qid, _, _ in rows]


def answer_rows(
    trial_id: str, step: int, condition: str, rows: list[tuple[int, int, Messages]], texts: list[str],
    judges: dict[str, Scorer], questions: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(completions rows, scores rows) of the answers `texts` to `rows` = (question id, sample, messages).

    `questions` are the raw questions the question ids index. The completions rows show the
    full prompt the model saw (IP text, system prompt and all); the judge gets the bare
    question (judge_questions). Shared by the in-trial evaluation and the post-sweep one
    (posteval.py).
    """
    prompts = [c[-1]["content"] if c[-1]["role"] == "user" else "" for _, _, c in rows]
    system = [next((m["content"] for m in c if m["role"] == "system"), None) for _, _, c in rows]
    keys = [{"trial_id": trial_id, "step": step, "condition": condition, "question_id": qid, "sample": sample}
            for qid, sample, _ in rows]
    completions = []
    for key, prompt, sys_prompt, text in zip(keys, prompts, system, texts, strict=True):
        shown = prompt if sys_prompt is None else f"[system] {sys_prompt}\n{prompt}"
        completions.append({**key, "prompt": shown, "completion": text})
    return completions, score_rows(keys, judge_questions(questions, rows), texts, judges)


def heldout_logprob_rows(trial_id: str, step: int, lps) -> list[dict[str, Any]]:
    """`heldout_logprob` rows: the mean per-token logprob of each held-out completion."""
    return [{"trial_id": trial_id, "step": step, "example_id": i,
             "logprob": float(np.mean(lp)) if len(lp) else float("nan"), "n_tokens": int(len(lp))}
            for i, lp in enumerate(lps)]
