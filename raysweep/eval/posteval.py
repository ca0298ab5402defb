"""Post-sweep evaluation (eval.backend=vllm): every trial's checkpoints in one engine job.

With this backend, trials train and save their adapters but skip in-trial evaluation.
After the Tune run, `evaluate_sweep` builds one request per (trial, checkpoint step,
condition, question, sample) and per (trial, step, held-out completion), each with that
trial's adapter at that step, and runs them all through one vLLM engine (engine.VLLMEngine:
ray.data.llm, row-level LoRA). The judges grade the answers, and each (trial, step) gets
the same files the in-trial path writes, trials/<id>/eval/step_<n>.<table>.parquet, so
`run.gather` and the summary read them unchanged. A step whose scores file exists is
skipped, so a rerun evaluates only what is missing.

Conditions that need forward hooks cannot run inside vLLM: `training` of a trial whose
defense steers (pps) and `reinjected`. Their rows fall back to the transformers backend,
adapter by adapter with the hooks on (evaluate.condition_hooks).

Step 0 is the base model (LoRA B = 0 at initialisation), so its rows carry no adapter and,
like any identical requests (same adapter, tokens and sampling), are computed once.
Sampling is seeded per row from (seed, condition, question, sample): the same for every
trial and step, so samples are paired across trials, as in the in-trial path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import ExperimentConfig
from .engine import Request, Result, TransformersEngine, VLLMEngine
from ..sweep.expand import Trial
from ..tables import write_table
from ..train.trial import EVAL_TABLES, trial_dir


@dataclass
class StepWork:
    """One (trial, step) to evaluate: its requests, and what turns the results into rows."""

    trial: Trial
    step: int
    adapter: str  # "" at step 0
    questions: list[str] = field(default_factory=list)  # the raw questions; the judge sees these alone
    answers: dict[str, list[tuple[int, int, list[dict]]]] = field(default_factory=dict)  # condition -> rows
    requests: dict[str, list[Request]] = field(default_factory=dict)  # condition (or "heldout") -> requests


def pending_steps(exp_dir: Path, trials: list[Trial]) -> list[tuple[Trial, int]]:
    """(trial, step) of every finished trial's eval step that has no scores file yet."""
    todo = []
    for t in trials:
        done = trial_dir(exp_dir, t.id) / "done.json"
        if not done.is_file():
            continue
        for step in json.loads(done.read_text())["eval_steps"]:
            if not (trial_dir(exp_dir, t.id) / "eval" / f"step_{step}.scores.parquet").is_file():
                todo.append((t, step))
    return todo


def needs_hooks(condition: str, cfg: ExperimentConfig) -> bool:
    """True when answering under `condition` needs forward hooks (steering)."""
    from .evaluate import condition_steering

    return bool(condition_steering(condition, cfg))


def step_work(exp_dir: Path, trial: Trial, step: int, tokenizer) -> StepWork:
    """The generation and held-out scoring requests of one (trial, step)."""
    from ..data import encode, read_chat, read_questions
    from ..train.defenses import make_defense
    from ..data.conversations import condition_conversations
    from .evaluate import _seed

    cfg, e = trial.config, trial.config.eval
    adapter = "" if step == 0 else str((Path(exp_dir) / "adapters" / trial.id / f"step_{step}").resolve())
    if adapter and not Path(adapter).is_dir():
        raise FileNotFoundError(f"trial {trial.id}: no adapter saved for step {step} at {adapter}")
    questions = read_questions(cfg.data.questions, cfg.data.n_questions)
    work = StepWork(trial, step, adapter, questions=questions)
    defense = make_defense(cfg.defense)
    for condition in e.conditions:
        convs = condition_conversations(questions, condition, defense, cfg.seed, cfg)
        rows = [(qid, s, c) for qid, c in enumerate(convs) for s in range(e.n_samples)]
        work.answers[condition] = rows
        work.requests[condition] = [
            Request(messages=c, adapter=adapter, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                    top_p=e.top_p, seed=_seed("sample", cfg.seed, condition, qid, s))
            for qid, s, c in rows
        ]
    if e.heldout_logprob and cfg.data.heldout:
        held = [encode(tokenizer, c, cfg.train.max_seq_len) for c in read_chat(cfg.data.heldout, cfg.data.n_heldout)]
        work.requests["heldout"] = [Request(input_ids=h.input_ids, labels=h.labels, adapter=adapter) for h in held]
    return work


def _run_unique(engine: VLLMEngine, requests: list[Request]) -> list[Result]:
    """engine.run on the distinct requests only (step 0 rows repeat across trials)."""
    keys = [json.dumps(asdict(r), sort_keys=True) for r in requests]
    unique: dict[str, Request] = {}
    for k, r in zip(keys, requests):
        unique.setdefault(k, r)
    results = dict(zip(unique, engine.run(list(unique.values()))))
    return [results[k] for k in keys]


def _run_with_hooks(works: list[StepWork], model: str, dtype: str, batch_size: int) -> dict[tuple, list[Result]]:
    """Hook conditions on the transformers backend: (trial id, step, condition) -> results."""
    from ..train.defenses import make_defense
    from .evaluate import condition_hooks

    out: dict[tuple, list[Result]] = {}
    engine = None
    for w in works:
        cfg = w.trial.config
        for condition in [c for c in cfg.eval.conditions if needs_hooks(c, cfg)]:
            engine = engine or TransformersEngine(model, dtype, batch_size=batch_size)
            defense = make_defense(cfg.defense)
            out[(w.trial.id, w.step, condition)] = engine.run(
                w.requests[condition], context=lambda m, c=condition: condition_hooks(c, cfg, defense, m))
    return out


def evaluate_sweep(exp_dir: Path, trials: list[Trial], **engine_options) -> int:
    """Evaluate every pending (trial, step) of a finished sweep; return how many were written.

    One vLLM engine per study model serves every trial's adapters; `engine_options` go to
    engine.VLLMEngine. Needs a running Ray.
    """
    from transformers import AutoTokenizer

    from .judges import make_judges
    from ..train.models import resolve_model

    exp_dir = Path(exp_dir)
    pending = pending_steps(exp_dir, trials)
    by_model: dict[tuple[str, str], list[tuple[Trial, int]]] = {}
    for t, step in pending:
        by_model.setdefault((t.config.model.name, t.config.model.dtype), []).append((t, step))
    judges: dict[str, Any] = {}
    for (model, dtype), items in by_model.items():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        works = [step_work(exp_dir, t, step, tokenizer) for t, step in items]
        # Everything without hooks: one engine job.
        plain = [(w, name) for w in works for name in w.requests
                 if name == "heldout" or not needs_hooks(name, w.trial.config)]
        flat = [r for w, name in plain for r in w.requests[name]]
        results = _run_unique(VLLMEngine(model, dtype, **engine_options), flat) if flat else []
        got: dict[tuple, list[Result]] = {}
        k = 0
        for w, name in plain:
            got[(w.trial.id, w.step, name)] = results[k : k + len(w.requests[name])]
            k += len(w.requests[name])
        got.update(_run_with_hooks(works, model, dtype, max(w.trial.config.eval.batch_size for w in works)))
        for w in works:
            e = w.trial.config.eval
            key = json.dumps(asdict(e), sort_keys=True, default=str)
            if key not in judges:  # trials with the same eval settings share their judges
                judges[key] = make_judges(e)
            write_step(exp_dir, w, got, judges[key])
    return len(pending)


def write_step(exp_dir: Path, w: StepWork, got: dict[tuple, list[Result]], judges) -> None:
    """Grade one (trial, step)'s answers and write its eval tables (scores last: it marks the step done)."""
    from .evaluate import answer_rows, heldout_logprob_rows

    tid = w.trial.id
    tables: dict[str, list[dict[str, Any]]] = {"completions": [], "scores": [], "heldout_logprob": []}
    for condition, rows in w.answers.items():
        texts = [r.text for r in got[(tid, w.step, condition)]]
        completions, scores = answer_rows(tid, w.step, condition, rows, texts, judges, w.questions)
        tables["completions"] += completions
        tables["scores"] += scores
    if "heldout" in w.requests:
        tables["heldout_logprob"] = heldout_logprob_rows(tid, w.step, [r.logprobs for r in got[(tid, w.step, "heldout")]])
    for name in EVAL_TABLES:
        write_table(trial_dir(exp_dir, tid) / "eval" / f"step_{w.step}.{name}.parquet", tables[name], name)
