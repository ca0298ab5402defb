"""`python -m raysweep.run exp=NAME [key=value ...]`: run an experiment's sweep end to end.

Resolves the config, expands the trial grid, checks every input before anything runs,
trains the unfinished trials on Ray Tune, then gathers the per-trial parts into the
experiment's tables and prints a summary. Re-running skips finished trials.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError
from ..config.load import load_config, parse_exp_args
from ..config.schema import ExperimentConfig, to_yaml
from ..config.backend import resolve_backend
from .storage import open_store
from .expand import Trial, check_inputs, expand, start_trial, start_trials
from ..tables import concat_parts, write_table, write_text
from ..train.trial import EVAL_TABLES, is_done, prepare, trial_dir

USAGE = "usage: python -m raysweep.run exp=NAME [key=value ...]   (dry_run=true lists the trials)"


def _compared(key: str) -> bool:
    """An axis of the defense being compared (kind, IP prompt/mode/placement/pool, PPS triples).

    Everything else, `defense.grad.*` included (gradient manipulation composes with any
    defense), must be equal for two trials to be compared.
    """
    return key in ("defense", "defense.kind", "defense.pps") or key.startswith(("defense.ip.", "defense.pps."))


def _group(t: Trial) -> tuple:
    """The axes other than the compared defense: trials with the same group are compared with each other."""
    return tuple(sorted((k, json.dumps(v, default=str)) for k, v in t.axes.items() if not _compared(k)))


def controls(trials: list[Trial], neutral: str) -> dict[str, tuple[str, str]]:
    """trial id -> (no-defense control id, neutral-prompt control id) at the same grid point.

    A trial's controls differ from it only in the compared defense (`_compared`); every other
    axis, `defense.grad.*` included, is equal. The neutral control also has the trial's IP
    mode and placement. "" = no such trial.
    """
    none = {_group(t): t.id for t in trials if t.config.defense.kind == "none"}
    neutral_ids = {
        (_group(t), t.config.defense.ip.mode, t.config.defense.ip.placement): t.id
        for t in trials
        if t.config.defense.kind == "ip" and neutral and t.config.defense.ip.prompt == neutral
    }
    out = {}
    for t in trials:
        ip = t.config.defense.ip
        is_ip = t.config.defense.kind == "ip"
        out[t.id] = (none.get(_group(t), ""), neutral_ids.get((_group(t), ip.mode, ip.placement), "") if is_ip else "")
    return out


def print_grid(trials: list[Trial]) -> None:
    keys = sorted({k for t in trials for k in t.axes})
    print(f"{len(trials)} trials")
    print(f"  {'id':<12}  {'label':<40}  " + "  ".join(keys))
    for t in trials:
        print(f"  {t.id:<12}  {t.label:<40}  " + "  ".join(str(t.axes.get(k, "")) for k in keys))


def gather(exp_dir: Path, trials: list[Trial], neutral: str, errors: dict[str, str]) -> None:
    """Merge the per-trial parts into the experiment's tables (each written atomically)."""
    ctl = controls(trials, neutral)
    rows = []
    for t in trials:
        done = trial_dir(exp_dir, t.id) / "done.json"
        info = json.loads(done.read_text()) if done.is_file() else {}
        rows.append(
            {"trial_id": t.id, "label": t.label, "status": "done" if info else "failed",
             "error": errors.get(t.id, ""), "steps": info.get("steps", -1),
             "default_system_prompt": info.get("default_system_prompt"),
             "control_id": ctl[t.id][0], "neutral_id": ctl[t.id][1],
             "start": t.config.model.start, "start_id": getattr(start_trial(t.config), "id", ""),
             "defense": t.config.defense.kind, "prompt": t.config.defense.ip.prompt,
             "mode": t.config.defense.ip.mode if t.config.defense.kind == "ip" else "",
             "placement": t.config.defense.ip.placement if t.config.defense.kind == "ip" else "",
             "axes": json.dumps(t.axes, default=str), "config": json.dumps(asdict(t.config), default=str)}
        )
    write_table(exp_dir / "trials.parquet", rows)
    parts = [trial_dir(exp_dir, t.id) for t in trials]
    write_table(exp_dir / "losses.parquet", concat_parts([p / "losses.parquet" for p in parts if (p / "losses.parquet").is_file()], "losses"))
    for name in EVAL_TABLES:
        files = [f for p in parts for f in sorted((p / "eval").glob(f"step_*.{name}.parquet"))]
        write_table(exp_dir / f"{name}.parquet", concat_parts(files, name))


def show_summary(exp_dir: Path, cfg: ExperimentConfig) -> None:
    import polars as pl

    from ..analysis.summary import format_summary, summarize

    trials = pl.read_parquet(exp_dir / "trials.parquet").filter(pl.col("status") == "done")
    if not trials.height:
        return
    df = summarize(trials, pl.read_parquet(exp_dir / "scores.parquet"),
                   pl.read_parquet(exp_dir / "heldout_logprob.parquet"), cfg.neutral_prompt,
                   traits=[cfg.eval.trait, *cfg.eval.extra_traits])  # one row per (trial, trait)
    write_table(exp_dir / "summary.parquet", df.to_arrow())
    print(format_summary(df, cfg.eval.trait))
    if cfg.sweep.select.heuristic:
        show_prediction(exp_dir, trials, pl.read_parquet(exp_dir / "scores.parquet"))
    sysp = trials["default_system_prompt"][0]
    print(f"default condition = the template's default: system prompt {sysp!r}" if sysp else
          "default condition = the template's default: no system prompt")


def show_prediction(exp_dir: Path, trials, scores) -> None:
    """sweep.select: the heuristic against the trained prompts' suppression (prediction.parquet,
    prediction_fit.parquet), printed after the summary."""
    import polars as pl

    from ..analysis.prediction import format_prediction, prediction, prediction_fit
    from .select import SELECTION

    if not (exp_dir / SELECTION).is_file():
        return
    pred = prediction(pl.read_parquet(exp_dir / SELECTION), trials, scores)
    fit = prediction_fit(pred)
    write_table(exp_dir / "prediction.parquet", pred.to_arrow())
    write_table(exp_dir / "prediction_fit.parquet", fit.to_arrow())
    print(format_prediction(pred, fit))


def post_sweep_eval(exp_dir: Path, trials: list[Trial], cfg: ExperimentConfig) -> None:
    """eval.backend=vllm: the finished trials' unevaluated checkpoints, in one engine job (posteval.py)."""
    from ..eval.posteval import evaluate_sweep
    from .ray_runner import ensure_ray

    ensure_ray(dashboard=cfg.dashboard)
    n = evaluate_sweep(exp_dir, trials, num_cpus=max(1, int(cfg.sweep.cpus_per_trial)),
                       num_gpus=1 if cfg.sweep.gpus_per_trial else 0)
    print(f"{cfg.name}: evaluated {n} checkpoints after the sweep (eval.backend=vllm)")


def run_starts(starts: list[Trial], store, cfg: ExperimentConfig) -> dict[str, str]:
    """Pre-finetune the unfinished starting models (a first wave of trials); trial id -> error."""
    todo = [s for s in starts if not is_done(store.exp_dir, s.id)]
    if starts:
        print(f"{cfg.name}: {len(starts)} pre-finetuned starting models, {len(todo)} to train")
    if not todo:
        return {}
    from .ray_runner import run_trials

    errors = run_trials(todo, store, cfg.sweep, f"{cfg.name}-starts", dashboard=cfg.dashboard)
    store.pull("trials", skip=("resume_",))
    return errors


def select_trials(cfg: ExperimentConfig, trials: list[Trial]) -> list[Trial]:
    """sweep.select: the trials of the prompts the heuristic picks (select.py), with
    selection.parquet (and the heuristics stage's tables, when it ran) on the store."""
    from .select import SELECTION, check, select

    cands = check(cfg)  # every setting, before the store is touched
    store = open_store(cfg.storage, cfg.name)
    for rel in (SELECTION, "cache"):
        store.pull(rel)
    chosen, _rows = select(cfg, trials, store.exp_dir, cands)
    store.push("", recursive=False)
    store.push("cache")
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        exp, overrides = parse_exp_args(argv, USAGE)
        cfg = load_config(exp, overrides)
        trials = expand(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.sweep.select.heuristic:
        try:
            trials = select_trials(cfg, trials)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: storage={cfg.storage!r}: {exc}", file=sys.stderr)
            return 2
    starts = start_trials(trials)
    if cfg.dry_run:
        print_grid(trials)
        if starts:
            print(f"pre-finetuned starting models (run first): {', '.join(f'{s.label} {s.id}' for s in starts)}")
    try:
        check_inputs(trials)
    except ConfigError as exc:
        if cfg.dry_run:  # a dry run lists the grid before the data exists
            print(f"note: inputs are not ready: {exc}", file=sys.stderr)
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        return 0
    try:
        # A directory is used in place; an object store is mirrored in a local scratch
        # directory (exp_dir): pull the trials' markers and parts, push what the driver writes.
        store = open_store(cfg.storage, cfg.name)
        exp_dir = store.exp_dir
        store.pull("trials", skip=("resume_",))
        write_text(exp_dir / "config.yaml", to_yaml(cfg))
        for t in starts + trials:
            prepare(exp_dir, t.id, t.config, t.label)
        store.push("config.yaml")
        store.push("trials")
    except ConfigError as exc:  # storage unusable (storage.StorageError) or a bad URI
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: storage={cfg.storage!r} is not writable: {exc}", file=sys.stderr)
        return 2
    errors = run_starts(starts, store, cfg)
    todo = [t for t in trials if not is_done(exp_dir, t.id)]
    print(f"{cfg.name}: {len(trials)} trials, {len(trials) - len(todo)} finished, {len(todo)} to run -> {store.uri}")
    for t in todo:  # a trial whose starting model failed cannot run
        st = start_trial(t.config)
        if st is not None and st.id in errors:
            errors[t.id] = f"its starting model {st.label} ({st.id}) failed"
    todo = [t for t in todo if t.id not in errors]
    if todo:
        from .ray_runner import run_trials

        errors.update(run_trials(todo, store, cfg.sweep, cfg.name, dashboard=cfg.dashboard))
        store.pull("trials", skip=("resume_",))
    if resolve_backend(cfg.eval.backend) == "vllm":
        from ..eval.posteval import pending_steps

        for t, step in pending_steps(exp_dir, trials):  # from an object store: the adapters it will read
            store.pull(f"adapters/{t.id}/step_{step}")
        post_sweep_eval(exp_dir, trials, cfg)
        store.push("trials")
    gather(exp_dir, trials, cfg.neutral_prompt, errors)
    show_summary(exp_dir, cfg)
    store.push("", recursive=False)  # the experiment's tables, each one object
    if errors:
        for tid, err in errors.items():
            print(f"error: trial {tid} failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
