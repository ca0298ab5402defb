"""One trial: a plain function of a resolved config that runs without Ray.

It fine-tunes a LoRA adapter under the trial's defense, saves the adapter at every
checkpoint step, evaluates the checkpoints, and keeps a crash-resume state (adapter,
optimiser, scheduler, losses so far). Called again after a crash, it resumes from the
newest state and reproduces the same batches, so no step is lost or duplicated. A finished
trial deletes its resume state (unless train.keep_resume): its adapters and tables hold
every result.

Layout under the experiment directory:
  trials/<id>/config.yaml  resolved config        trials/<id>/losses.parquet
  trials/<id>/eval/step_<n>.<table>.parquet       trials/<id>/done.json
  trials/<id>/resume.json -> resume_<step>/       adapters/<id>/step_<n>/
  trials/<id>/attempts/*.json  one record per (re)start: pid, Ray node
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from ..config.schema import ExperimentConfig, to_yaml
from ..tables import write_json, write_table, write_text

Report = Callable[[dict[str, Any]], None]
EVAL_TABLES = ("completions", "scores", "heldout_logprob")


def trial_dir(exp_dir: Path, tid: str) -> Path:
    return Path(exp_dir) / "trials" / tid


def is_done(exp_dir: Path, tid: str) -> bool:
    return (trial_dir(exp_dir, tid) / "done.json").is_file()


def prepare(exp_dir: Path, tid: str, cfg: ExperimentConfig, label: str) -> None:
    """Write the trial's resolved config (before it runs, so any process can run it).

    A file that already holds the same text is left alone: a re-run then uploads nothing
    to an object store (storage.py compares sizes and mtimes).
    """
    d = trial_dir(exp_dir, tid)
    spec = {"trial_id": tid, "label": label, "config": asdict(cfg)}
    for path, text in ((d / "config.yaml", to_yaml(cfg)),
                       (d / "config.json", json.dumps(spec, indent=2, sort_keys=True, default=str))):
        if not (path.is_file() and path.read_text() == text):
            write_text(path, text)


def start_adapter(exp_dir: Path, cfg: ExperimentConfig) -> Path | None:
    """The adapter merged into the base before the trial's own LoRA (model.start), or None.

    A key of `starts` names the final adapter of its pre-finetuning trial in this experiment
    (sweep.start_trial), which must have finished; anything else is an adapter directory.
    """
    from ..sweep.expand import start_trial

    if not cfg.model.start:
        return None
    st = start_trial(cfg)
    if st is None:
        return Path(cfg.model.start)
    done = trial_dir(exp_dir, st.id) / "done.json"
    if not done.is_file():
        raise RuntimeError(f"starting model {cfg.model.start!r} (pre-finetuning trial {st.id}) has not finished")
    return Path(exp_dir) / "adapters" / st.id / f"step_{json.loads(done.read_text())['steps']}"


def _save_dir_atomically(save: Callable[[Path], None], dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)


def _save_resume(tdir: Path, model, opt, sched, step: int, losses: list[dict]) -> None:
    import torch

    def save(d: Path) -> None:
        model.save_pretrained(str(d))
        torch.save({"step": step, "opt": opt.state_dict(), "sched": sched.state_dict(), "losses": losses}, d / "state.pt")

    _save_dir_atomically(save, tdir / f"resume_{step}")
    previous = _resume_pointer(tdir)
    write_json(tdir / "resume.json", {"step": step})
    if previous is not None and previous != step:
        shutil.rmtree(tdir / f"resume_{previous}", ignore_errors=True)


def _drop_resume(tdir: Path) -> bool:
    """Delete a finished trial's resume state; True if there was any.

    Called only once done.json is written: a crash before it leaves the state to resume
    from, a crash during it leaves a leftover that the next call of a done trial deletes.
    The pointer goes first, so it never names a missing directory. Hidden `.resume_*`
    directories are the temporaries of saves that a crash interrupted.
    """
    states = [*tdir.glob("resume_*"), *tdir.glob(".resume_*")]
    pointer = tdir / "resume.json"
    if not states and not pointer.exists():
        return False
    pointer.unlink(missing_ok=True)
    for d in states:
        shutil.rmtree(d, ignore_errors=True)
    return True


def _resume_pointer(tdir: Path) -> int | None:
    p = tdir / "resume.json"
    return json.loads(p.read_text())["step"] if p.is_file() else None


def _load_resume(tdir: Path, model, opt, sched) -> tuple[int, list[dict]]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    step = _resume_pointer(tdir)
    if step is None:
        return 0, []
    d = tdir / f"resume_{step}"
    set_peft_model_state_dict(model, load_file(str(d / "adapter_model.safetensors")))
    state = torch.load(str(d / "state.pt"), weights_only=False)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return state["step"], state["losses"]


def run_trial(
    cfg: ExperimentConfig, exp_dir: Path, tid: str, label: str = "", report: Report | None = None,
    info: dict[str, Any] | None = None, saved: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one trial (resuming if a previous attempt left a state).

    `info` (e.g. the Ray node that ran it) is recorded in the trial's done.json; `saved` is
    called after every saved state and after done.json (to mirror the files to shared storage).
    """
    import polars as pl
    import torch

    from ..analysis.queries import step_metrics
    from ..data import encode, read_chat, read_questions, shuffled
    from .defenses import make_defense
    from ..config.backend import resolve_backend
    from ..eval.evaluate import evaluate_step
    from ..eval.judges import make_judges
    from .grad import gradient_manipulation, load_grad_vectors
    from .models import default_system_prompt, load_model, merge_adapter
    from .step import Collator, add_lora, checkpoint_steps, example_order, make_optimizer, total_steps, train_step

    exp_dir = Path(exp_dir)
    tdir = trial_dir(exp_dir, tid)
    report = report or (lambda metrics: None)
    saved = saved or (lambda: None)
    if is_done(exp_dir, tid):  # e.g. a retry after a crash between done.json and the clean-up below
        if not cfg.train.keep_resume and _drop_resume(tdir):
            saved()
        return json.loads((tdir / "done.json").read_text())
    started = time.time()
    tdir.mkdir(parents=True, exist_ok=True)
    write_text(tdir / "pid", str(os.getpid()))
    # One record per attempt: where each (re)start of this trial ran.
    write_json(tdir / "attempts" / f"{time.time_ns()}-{os.getpid()}.json", {"pid": os.getpid(), **(info or {})})
    torch.set_num_threads(max(1, cfg.threads or int(os.environ.get("RAYSWEEP_THREADS", "1"))))

    model, tok = load_model(cfg.model.name, cfg.model.dtype)
    start = start_adapter(exp_dir, cfg)
    if start is not None:  # a pre-finetuned starting model: its adapter becomes part of the base
        model = merge_adapter(model, start)
    defense = make_defense(cfg.defense)
    t = cfg.train
    examples = shuffled(read_chat(cfg.data.train), cfg.seed, cfg.data.n_train)
    encoded = [encode(tok, c, t.max_seq_len) for c in defense.conversations(examples, cfg.seed)]
    questions = read_questions(cfg.data.questions, cfg.data.n_questions)
    heldout = []
    if cfg.eval.heldout_logprob and cfg.data.heldout:
        heldout = [encode(tok, c, t.max_seq_len) for c in read_chat(cfg.data.heldout, cfg.data.n_heldout)]
    judges = make_judges(cfg.eval)

    model = add_lora(model, t, cfg.seed)
    total = total_steps(t, len(encoded))
    eval_steps = set(s for s in cfg.eval.steps if 0 <= s <= total) or set(checkpoint_steps(t, total))
    ckpts = set(checkpoint_steps(t, total)) | eval_steps
    opt, sched = make_optimizer(model, t, total)
    start, losses = _load_resume(tdir, model, opt, sched)
    if start:
        report({"resumed_from": start})
    batches = example_order(len(encoded), total, t.grad_accum, t.batch_size, cfg.seed)
    collate = Collator(tok.pad_token_id)
    grad_vectors = load_grad_vectors(cfg.defense.grad, model) if cfg.defense.grad.mode != "none" else {}
    adapters = exp_dir / "adapters" / tid
    # eval.backend=vllm: the adapters are evaluated after the sweep, all in one job (posteval.py).
    in_trial_eval = resolve_backend(cfg.eval.backend) == "transformers"

    def checkpoint(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if step in ckpts:
            _save_dir_atomically(lambda d: model.save_pretrained(str(d)), adapters / f"step_{step}")
        if step in eval_steps and in_trial_eval and not (tdir / "eval" / f"step_{step}.scores.parquet").is_file():
            model.eval()
            with torch.inference_mode():
                rows = evaluate_step(model, tok, cfg, tid, step, defense, questions, heldout, judges, exp_dir / "cache")
            for name in EVAL_TABLES:  # scores last: its presence marks the step as evaluated
                write_table(tdir / "eval" / f"step_{step}.{name}.parquet", rows[name], name)
            # Per-trait means by analysis (trait_<cond>/<trait>; trait_<cond> = eval.trait's), as the summary has them.
            ev = tdir / "eval"
            metrics.update(step_metrics(pl.read_parquet(ev / f"step_{step}.scores.parquet"),
                                        pl.read_parquet(ev / f"step_{step}.heldout_logprob.parquet"),
                                        cfg.eval.trait, cfg.eval.conditions))
        write_table(tdir / "losses.parquet", losses, "losses")
        _save_resume(tdir, model, opt, sched, step, losses)
        saved()
        return metrics

    if start == 0:
        report({"step": 0, **checkpoint(0)})
    for step in range(start + 1, total + 1):
        idx = batches[step - 1]  # this step's micro-batches (an epoch's last step may be shorter)
        micro = [collate([encoded[i] for i in b]) for b in idx]
        model.train()
        torch.manual_seed(cfg.seed * 100003 + step)  # dropout masks reproduce after a resume
        with defense.active(model), gradient_manipulation(model, grad_vectors, cfg.defense.grad.mode):
            m = train_step(model, opt, sched, micro, t.max_grad_norm)
        losses.append({"trial_id": tid, "step": step, **m})
        metrics = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"]}
        if step in ckpts:
            metrics.update(checkpoint(step))
        elif t.resume_every and step % t.resume_every == 0:
            write_table(tdir / "losses.parquet", losses, "losses")
            _save_resume(tdir, model, opt, sched, step, losses)
            saved()
        report(metrics)

    summary = {
        "trial_id": tid, "label": label, "status": "done", "steps": total,
        "final_loss": losses[-1]["loss"] if losses else None,
        "default_system_prompt": default_system_prompt(tok),
        "checkpoints": sorted(ckpts), "eval_steps": sorted(eval_steps),
        "wall_s": time.time() - started, "resumed_from": start, **(info or {}),
    }
    write_json(tdir / "done.json", summary)  # every result is on disk before this marker
    if not t.keep_resume:  # after the marker: a crash in between leaves a leftover, never a lost trial
        _drop_resume(tdir)
    saved()  # the marker reaches a store before the store's resume state is deleted (storage.py)
    return summary
