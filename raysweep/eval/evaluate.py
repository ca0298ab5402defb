"""One checkpoint's evaluation: the conditions, the in-trial run, and the eval tables' rows.

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

Each checkpoint's requests come from worklist.work_list (one list, one seeding rule). The
in-trial path (`evaluate_step`) runs it on the model being trained, each condition under its
hooks (`condition_hooks`); the post-sweep path (posteval.py) on an engine. Both turn the
results into the completions, scores and heldout_logprob rows here (`step_tables`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from ..errors import ConfigError
from ..config.identity import vector_key
from ..config.schema import ExperimentConfig, SteerConfig
from ..data import Encoded, Messages
from ..train.defenses import Defense, load_vector, steer
from .judges import Scorer
from .worklist import HELDOUT, Result, WorkItem, by_name, run_on_model, work_list


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


def evaluate_step(
    model, tokenizer, cfg: ExperimentConfig, trial_id: str, step: int, defense: Defense,
    questions: list[str], heldout: list[Encoded], judges: dict[str, Scorer] | Scorer, cache: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Rows for the completions, scores and heldout_logprob tables at one checkpoint, in-trial.

    The work list runs on `model` as it is (worklist.run_on_model), each condition under its
    hooks (condition_hooks). `judges` maps trait -> scorer (judges.make_judges: eval.trait,
    plus coherence and alignment when eval.em is on); a single scorer scores eval.trait.

    At step 0 the adapter is the identity (LoRA B = 0), so answers and held-out logprobs
    are the base model's: with `cache`, each distinct set of messages (and steering) is
    computed once per experiment and shared by every trial.
    """
    e = cfg.eval
    judges = judges if isinstance(judges, dict) else {e.trait: judges}
    base = {"model": cfg.model, "eval": e, "seed": cfg.seed}
    if cfg.model.start:  # a starting model: named by its recipe or its adapter's content
        from ..config.identity import start_key

        base["start"] = start_key(cfg), cfg.starts
    memo = cache if step == 0 else None  # step 0 is the base model: results depend only on the requests
    items = work_list(cfg, questions, heldout, defense=defense)
    results: dict[str, list[Result]] = {}
    for name, group in by_name(items).items():
        requests = [item.request for item in group]
        if name == HELDOUT:
            def logprobs(requests=requests) -> list[list[float]]:
                return [r.logprobs.tolist() for r in run_on_model(model, tokenizer, requests, e.batch_size)]

            lps = _memo(memo, {**base, "heldout": [r.input_ids for r in requests]}, logprobs)
            results[name] = [Result(logprobs=np.asarray(lp, dtype=np.float64)) for lp in lps]
            continue
        with condition_hooks(name, cfg, defense, model):
            def texts(requests=requests) -> list[str]:
                return [r.text for r in run_on_model(model, tokenizer, requests, e.batch_size)]

            key = {**base, "generate": [r.messages for r in requests], "steering": steering_key(name, cfg)}
            results[name] = [Result(text=t) for t in _memo(memo, key, texts)]
    return step_tables(trial_id, step, items, results, judges, questions)


# ---------------------------------------------------------------------------------------------
# Results -> the eval tables (both paths)


def step_tables(
    trial_id: str, step: int, items: Sequence[WorkItem], results: dict[str, list[Result]],
    judges: dict[str, Scorer], questions: Sequence[str],
) -> dict[str, list[dict[str, Any]]]:
    """The completions, scores and heldout_logprob rows of one checkpoint's work list.

    `results` maps each name of the work list (condition, HELDOUT) to its results, in work
    list order. Shared by the in-trial evaluation and the post-sweep one (posteval.py).
    """
    tables: dict[str, list[dict[str, Any]]] = {"completions": [], "scores": [], "heldout_logprob": []}
    for name, group in by_name(items).items():
        got = results[name]
        if len(got) != len(group):
            raise ValueError(f"{name}: {len(got)} results for {len(group)} requests")
        if name == HELDOUT:
            tables["heldout_logprob"] = heldout_logprob_rows(trial_id, step, [r.logprobs for r in got])
            continue
        completions, scores = answer_rows(trial_id, step, group, [r.text for r in got], judges, questions)
        tables["completions"] += completions
        tables["scores"] += scores
    return tables


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


def judge_questions(questions: Sequence[str], items: Sequence[WorkItem]) -> list[str]:
    """The question the judge is sent with each answer of `items`.

    It is the evaluation question as asked in the default condition (the raw text from the
    questions file), under every condition: the judge never sees an inoculation prompt, an
    added_back text or a system prompt, so all conditions are judged on the same question
    (seed 003: the judge receives the evaluation instruction alone). The single place both
    the in-trial and the post-sweep evaluation build the judge's question.
    """
    return [questions[item.question_id] for item in items]


def answer_rows(
    trial_id: str, step: int, items: Sequence[WorkItem], texts: list[str], judges: dict[str, Scorer],
    questions: Sequence[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(completions rows, scores rows) of the answers `texts` to the generation rows `items`.

    `questions` are the raw questions the question ids index. The completions rows show the
    full prompt the model saw (IP text, system prompt and all); the judge gets the bare
    question (judge_questions).
    """
    messages: list[Messages] = [item.request.messages for item in items]
    prompts = [c[-1]["content"] if c[-1]["role"] == "user" else "" for c in messages]
    system = [next((m["content"] for m in c if m["role"] == "system"), None) for c in messages]
    keys = [{"trial_id": trial_id, "step": step, "condition": item.condition, "question_id": item.question_id,
             "sample": item.sample} for item in items]
    completions = []
    for key, prompt, sys_prompt, text in zip(keys, prompts, system, texts, strict=True):
        shown = prompt if sys_prompt is None else f"[system] {sys_prompt}\n{prompt}"
        completions.append({**key, "prompt": shown, "completion": text})
    return completions, score_rows(keys, judge_questions(questions, items), texts, judges)


def heldout_logprob_rows(trial_id: str, step: int, lps) -> list[dict[str, Any]]:
    """`heldout_logprob` rows: the mean per-token logprob of each held-out completion."""
    return [{"trial_id": trial_id, "step": step, "example_id": i,
             "logprob": float(np.mean(lp)) if len(lp) else float("nan"), "n_tokens": int(len(lp))}
            for i, lp in enumerate(lps)]
