"""The only module that touches Ray's APIs (they drift between releases): Tune for sweeps,
Ray Data jobs (an actor pool; a ray.data.llm vLLM processor) for batch stages, and
`ensure_ray`, the one way a stage starts or joins Ray.

Each trial of a sweep becomes one Ray Tune trial running `trial.run_trial`; metrics go
to Tune every logging step (dashboard, TensorBoard; W&B with log.wandb). Crashed trials
are retried (FailureConfig) and resume from their own crash-resume state.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..config.load import check_logging
from ..config.schema import SweepConfig, from_dict
from .storage import Store, is_uri, open_experiment
from .expand import Trial
from ..train.trial import Report


def _trainable(config: dict) -> None:
    import ray
    from ray import tune

    # Tune starts function trials in their own directory; data paths are relative to the driver's.
    if os.path.isdir(config["workdir"]):
        os.chdir(config["workdir"])
    os.environ["RAYSWEEP_THREADS"] = str(config["threads"])
    where = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    run_prepared(config["exp_dir"], config["trial_id"], report=tune.report, info=where)


def run_prepared(exp: str, tid: str, report: Report | None = None, info: dict | None = None) -> dict:
    """Run trial `tid` that the driver prepared under `exp` (a directory or an object-store URI).

    On an object store the trial runs in node-local scratch: it starts from its mirrored
    state (resuming wherever it last saved, on any node) and mirrors every saved state.
    """
    from .expand import start_trial
    from ..train.trial import run_trial, trial_dir

    store = open_experiment(exp)
    store.pull(f"trials/{tid}")
    spec = json.loads((trial_dir(store.exp_dir, tid) / "config.json").read_text())
    cfg = from_dict(spec["config"])
    st = start_trial(cfg)
    if st is not None:  # the starting model's adapter, which this trial merges into the base
        store.pull(f"trials/{st.id}", skip=("resume_",))
        store.pull(f"adapters/{st.id}")

    def saved() -> None:  # adapters first: the trial's files point to them
        store.push(f"adapters/{tid}")
        store.push(f"trials/{tid}", mirror=True)

    summary = run_trial(cfg, store.exp_dir, tid, spec["label"], report=report, info=info,
                        saved=saved)
    pulled = (f"trials/{st.id}", f"adapters/{st.id}") if st is not None else ()
    for rel in (f"trials/{tid}", f"adapters/{tid}", *pulled):  # all on the store now (a no-op for a directory)
        store.discard(rel)
    return summary


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Connect to RAY_ADDRESS if set, else start a local Ray (loopback only).

    With `dashboard`, the local Ray serves its dashboard (needs ray[default]) and its URL
    is printed.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    elif dashboard:
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       configure_logging=False)
        print(f"Ray dashboard: http://{ctx.dashboard_url}", flush=True)
    else:
        # "local": always a new instance; a bare ray.init() would attach to the last cluster
        # that `ray start` launched on this machine, even a dead one.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, configure_logging=False)


def map_with_actor_pool(rows: list[dict[str, Any]], actor: type, actor_kwargs: dict[str, Any], *, concurrency: int,
                        batch_rows: int, num_cpus: float, num_gpus: float):
    """One Ray Data job: `rows` through a pool of `concurrency` `actor`s (each built once with
    `actor_kwargs`, called on pyarrow batches of `batch_rows`); the results as one Arrow table,
    rows in the order they came back. Needs a running Ray (ensure_ray)."""
    import pyarrow as pa
    import ray

    out = ray.data.from_items(rows).map_batches(
        actor, fn_constructor_kwargs=actor_kwargs, compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_rows, batch_format="pyarrow", num_cpus=num_cpus, num_gpus=num_gpus)
    return pa.concat_tables(ray.get(out.to_arrow_refs()))


def run_llm_job(processor_config: dict[str, Any], rows: list[dict[str, Any]], postprocess) -> list[dict[str, Any]]:
    """One ray.data.llm job: `rows` through a vLLM engine processor built from `processor_config`
    (vLLMEngineProcessorConfig's fields), each output row through `postprocess`. Needs a running Ray."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    processor = build_processor(vLLMEngineProcessorConfig(**processor_config), postprocess=postprocess)
    return processor(ray.data.from_items(rows)).take_all()


def _keep_credentials_out_of_ray() -> None:
    """Stop Tune from copying the driver's AWS keys into every trial's runtime_env.

    Ray writes a runtime_env in plain text to its logs (runtime_env_agent.log) and shows it
    on the dashboard. Nodes take credentials from their own environment or instance role
    (the local Ray started by the driver inherits the driver's environment).
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(
        {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


def _wandb_callback(project: str):
    """Tune's own W&B logger for `project`, with the API key kept out of Ray's logs.

    Ray would hand WANDB_API_KEY to its logging actors in a runtime_env, which it writes in
    plain text to its logs (runtime_env_agent.log). The actors run on the driver's node and
    read the key from that node's environment instead: the local Ray started by the driver
    inherits the driver's; a cluster node has it if `ray start` had it.
    """
    import ray
    from ray.air.integrations.wandb import WandbLoggerCallback
    from ray.air.util.node import _force_on_current_node

    callback = WandbLoggerCallback(project=project)
    if not hasattr(callback, "_remote_logger_class"):  # Ray changed how it starts them: refuse, never leak
        raise RuntimeError("ray.air.integrations.wandb changed: check that WANDB_API_KEY stays out of runtime_env")
    # What Ray builds on the first trial (wandb.py, _start_logging_actor), without env_vars.
    callback._remote_logger_class = ray.remote(
        num_cpus=0, **_force_on_current_node(), max_restarts=-1, max_task_retries=-1)(callback._logger_actor_cls)
    return callback


def run_trials(
    trials: list[Trial], store: Store, sweep: SweepConfig, name: str, dashboard: bool = False
) -> dict[str, str]:
    """Run `trials` as one Tune experiment writing to `store`; return trial id -> error text for failures."""
    from ray import tune

    log = trials[0].config.log  # a run-only setting: the experiment's, the same in every trial
    check_logging(log)
    ensure_ray(dashboard=dashboard)
    _keep_credentials_out_of_ray()
    labels = {t.id: t.label for t in trials}
    resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(_trainable, resources),
        param_space={
            "trial_id": tune.grid_search([t.id for t in trials]),
            "exp_dir": store.uri if is_uri(store.uri) else str(store.exp_dir.resolve()),
            "workdir": os.getcwd(),
            "threads": max(1, int(sweep.cpus_per_trial)),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=sweep.max_concurrent or None,
            reuse_actors=True,  # a worker keeps its imports (torch, transformers: ~6 s a trial) for the next trial
            trial_name_creator=lambda tr: f"{labels[tr.config['trial_id']]}-{tr.config['trial_id']}",
            trial_dirname_creator=lambda tr: tr.config["trial_id"],
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=store.tune_path(),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # Tune's default loggers (CSV, JSON, TensorBoard) stay; these come on top.
            callbacks=[_wandb_callback(log.wandb)] if log.wandb else None,
            verbose=1,
        ),
    )
    results = tuner.fit()
    failures = {}
    for result in results:
        if result.error is not None:
            failures[result.config["trial_id"]] = str(result.error).strip().splitlines()[-1]
    return failures


def _in_dir(workdir: str, fn, args: tuple, kwargs: dict):
    if os.path.isdir(workdir):  # as in _trainable: data paths are relative to the driver's directory
        os.chdir(workdir)
    return fn(*args, **kwargs)


def run_task(fn, *args, num_cpus: float = 1.0, num_gpus: float = 0.0, **kwargs):
    """`fn(*args, **kwargs)` as one Ray task holding `num_cpus` / `num_gpus`, in the driver's
    working directory; its result. Starts or joins Ray (ensure_ray)."""
    import ray

    ensure_ray()
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(_in_dir)
    return ray.get(task.remote(os.getcwd(), fn, args, kwargs))
