"""Post-sweep evaluation (eval.backend=vllm): every trial's checkpoints in one engine job.

With this backend, trials train and save their adapters but skip in-trial evaluation.
After the Tune run, `evaluate_sweep` takes each pending (trial, checkpoint step)'s work list
(evaluate.work_list: the same requests the in-trial path runs, with that trial's adapter at
that step) and runs them all through one engine: vLLM (engine.VLLMEngine: ray.data.llm,
row-level LoRA), or the transformers reference (`engine="transformers"`, which gives exactly
the in-trial answers). The judges grade the answers, and each (trial, step) gets the same
files the in-trial path writes (evaluate.step_tables), trials/<id>/eval/step_<n>.<table>.parquet,
so `run.gather` and the summary read them unchanged. A step whose scores file exists is
skipped, so a rerun evaluates only what is missing.

Conditions that need forward hooks cannot run inside vLLM: `training` of a trial whose
defense steers (pps) and `reinjected`. Their rows fall back to the transformers backend,
adapter by adapter with the hooks on (evaluate.condition_hooks).

Step 0 is the base model (LoRA B = 0 at initialisation), so its rows carry no adapter and,
like any identical requests (same adapter, tokens, sampling group), are computed once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import ExperimentConfig
from .engine import Engine, Request, Result, TransformersEngine, VLLMEngine
from .evaluate import condition_hooks, condition_steering, step_tables
from .worklist import HELDOUT, WorkItem, by_name, work_list
from ..sweep.expand import Trial
from ..tables import write_table
from ..train.defenses import make_defense
from ..train.trial import EVAL_TABLES, trial_dir

ENGINES = ("vllm", "transformers")


@dataclass
class StepWork:
    """One (trial, step) to evaluate: its work list (evaluate.work_list) and the raw questions."""

    trial: Trial
    step: int
    adapter: str  # "" at step 0
    questions: list[str] = field(default_factory=list)  # the raw questions; the judge sees these alone
    items: list[WorkItem] = field(default_factory=list)

    @property
    def requests(self) -> dict[str, list[Request]]:
        """condition (or HELDOUT) -> its requests, in work list order."""
        return {name: [i.request for i in group] for name, group in by_name(self.items).items()}

    @property
    def answers(self) -> dict[str, list[tuple[int, int, list[dict]]]]:
        """condition -> (question id, sample, messages) of its generation rows."""
        return {name: [(i.question_id, i.sample, i.request.messages) for i in group]
                for name, group in by_name(self.items).items() if name != HELDOUT}


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
    return condition != HELDOUT and bool(condition_steering(condition, cfg))


def step_work(exp_dir: Path, trial: Trial, step: int, tokenizer) -> StepWork:
    """The work list of one (trial, step), with the adapter saved at that step (none at step 0)."""
    from ..data import encode, read_chat, read_questions

    cfg = trial.config
    adapter = "" if step == 0 else str((Path(exp_dir) / "adapters" / trial.id / f"step_{step}").resolve())
    if adapter and not Path(adapter).is_dir():
        raise FileNotFoundError(f"trial {trial.id}: no adapter saved for step {step} at {adapter}")
    questions = read_questions(cfg.data.questions, cfg.data.n_questions)
    heldout = []
    if cfg.eval.heldout_logprob and cfg.data.heldout:  # as the trial encodes them (train/trial.py)
        heldout = [encode(tokenizer, c, cfg.train.max_seq_len) for c in read_chat(cfg.data.heldout, cfg.data.n_heldout)]
    return StepWork(trial, step, adapter, questions, work_list(cfg, questions, heldout, adapter=adapter))


def _run_unique(engine: Engine, requests: list[Request]) -> list[Result]:
    """engine.run on the distinct requests only (step 0 rows repeat across trials)."""
    keys = [json.dumps(asdict(r), sort_keys=True) for r in requests]
    unique: dict[str, Request] = {}
    for k, r in zip(keys, requests):
        unique.setdefault(k, r)
    results = dict(zip(unique, engine.run(list(unique.values()))))
    return [results[k] for k in keys]


def run_works(works: list[StepWork], model: str, dtype: str, engine: str = "vllm",
              **engine_options) -> dict[tuple, list[Result]]:
    """Every work list of one study model: (trial id, step, condition or HELDOUT) -> results.

    Rows without hooks go to one `engine` run (engine_options to its constructor); rows that
    need hooks to the transformers backend, per (trial, step, condition) with the hooks on.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    reference: TransformersEngine | None = None

    def transformers() -> TransformersEngine:  # loaded on first use
        nonlocal reference
        if reference is None:
            reference = TransformersEngine(model, dtype, **(engine_options if engine == "transformers" else {}))
        return reference

    plain = [(w, name) for w in works for name in w.requests if not needs_hooks(name, w.trial.config)]
    flat = [r for w, name in plain for r in w.requests[name]]
    results = []
    if flat:
        results = _run_unique(VLLMEngine(model, dtype, **engine_options) if engine == "vllm" else transformers(), flat)
    got: dict[tuple, list[Result]] = {}
    k = 0
    for w, name in plain:
        n = len(w.requests[name])
        got[(w.trial.id, w.step, name)] = results[k : k + n]
        k += n
    for w in works:
        cfg = w.trial.config
        defense = make_defense(cfg.defense)
        for condition in [c for c in cfg.eval.conditions if needs_hooks(c, cfg)]:
            got[(w.trial.id, w.step, condition)] = transformers().run(
                w.requests[condition], context=lambda m, c=condition, cfg=cfg, d=defense: condition_hooks(c, cfg, d, m))
    return got


def evaluate_sweep(exp_dir: Path, trials: list[Trial], engine: str = "vllm", **engine_options) -> int:
    """Evaluate every pending (trial, step) of a finished sweep; return how many were written.

    One engine per study model serves every trial's adapters: engine.VLLMEngine (needs a
    running Ray), or engine.TransformersEngine with engine="transformers"; `engine_options`
    go to its constructor.
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
        got = run_works(works, model, dtype, engine, **engine_options)
        for w in works:
            e = w.trial.config.eval
            key = json.dumps(asdict(e), sort_keys=True, default=str)
            if key not in judges:  # trials with the same eval settings share their judges
                judges[key] = make_judges(e)
            write_step(exp_dir, w, got, judges[key])
    return len(pending)


def write_step(exp_dir: Path, w: StepWork, got: dict[tuple, list[Result]], judges) -> None:
    """Grade one (trial, step)'s answers and write its eval tables (scores last: it marks the step done)."""
    tid = w.trial.id
    results = {name: got[(tid, w.step, name)] for name in w.requests}
    tables = step_tables(tid, w.step, w.items, results, judges, w.questions)
    for name in EVAL_TABLES:
        write_table(trial_dir(exp_dir, tid) / "eval" / f"step_{w.step}.{name}.parquet", tables[name], name)
