"""The only module that touches Ray's APIs (they drift between releases).

Each trial of a sweep becomes one Ray Tune trial running `trial.run_trial`; metrics go
to Tune every logging step (dashboard, TensorBoard). Crashed trials are retried
(FailureConfig) and resume from their own crash-resume state.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .config import SweepConfig, from_dict
from .sweep import Trial


def _trainable(config: dict) -> None:
    from ray import tune

    from .trial import run_trial, trial_dir

    # Tune starts function trials in their own directory; data paths are relative to the driver's.
    if os.path.isdir(config["workdir"]):
        os.chdir(config["workdir"])
    os.environ["RAYSWEEP_THREADS"] = str(config["threads"])
    exp_dir = Path(config["exp_dir"])
    spec = json.loads((trial_dir(exp_dir, config["trial_id"]) / "config.json").read_text())
    import ray

    where = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    run_trial(from_dict(spec["config"]), exp_dir, spec["trial_id"], spec["label"], report=tune.report, info=where)


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


def run_trials(
    trials: list[Trial], exp_dir: Path, sweep: SweepConfig, name: str, dashboard: bool = False
) -> dict[str, str]:
    """Run `trials` as one Tune experiment; return trial id -> error text for failures."""
    from ray import tune

    ensure_ray(dashboard=dashboard)
    labels = {t.id: t.label for t in trials}
    resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(_trainable, resources),
        param_space={
            "trial_id": tune.grid_search([t.id for t in trials]),
            "exp_dir": str(Path(exp_dir).resolve()),
            "workdir": os.getcwd(),
            "threads": max(1, int(sweep.cpus_per_trial)),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=sweep.max_concurrent or None,
            trial_name_creator=lambda tr: f"{labels[tr.config['trial_id']]}-{tr.config['trial_id']}",
            trial_dirname_creator=lambda tr: tr.config["trial_id"],
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str((Path(exp_dir) / "tune").resolve()),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=1,
        ),
    )
    results = tuner.fit()
    failures = {}
    for result in results:
        if result.error is not None:
            failures[result.config["trial_id"]] = str(result.error).strip().splitlines()[-1]
    return failures
