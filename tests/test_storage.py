"""Results on an object store: sweeps with storage=s3://... against a real S3-compatible
HTTP server on loopback (moto's server), through pyarrow's S3 filesystem.

The sweep's CLI runs in subprocesses so that its local Ray (and the trials' worker
processes) get the credentials and the endpoint from the environment, as nodes of a
cluster do. The resume test runs a prepared trial in-process, as a Tune trial does
(tune_adapter.run_prepared), crashing it after a saved state and losing its scratch.
"""

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs
from test_sweep import EXPERIMENT
from tiers import heavy

from raysweep.config import load_config
from raysweep.sweep.run import main
from raysweep.sweep.storage import open_store
from raysweep.sweep.expand import expand
from raysweep.train.trial import prepare, run_trial
from raysweep.sweep.ray_runner import run_prepared

KEY_ID = "AKIA" + secrets.token_hex(8).upper()
SECRET = secrets.token_urlsafe(30)
ARMS = "sweep:\n  arms:\n    - defense: {kind: none}\n    - defense: {kind: ip, ip: {prompt: answer_french, mode: fixed}}\n  max_failures: 2\n"
TWO_TRIALS = EXPERIMENT.split("sweep:")[0] + ARMS


@heavy
@pytest.fixture()
def endpoint():
    """A fresh moto S3 server on an ephemeral loopback port; its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its state per process, not per server: start each test from an empty one.
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")).close()
    yield url
    server.stop()


@pytest.fixture()
def s3(endpoint, tmp_path, monkeypatch):
    """(environment for the CLI, pyarrow filesystem on the server) with a fresh bucket `bkt`."""
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL_S3": endpoint,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "RAYSWEEP_SCRATCH": str(tmp_path / "scratch")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fs, _ = pafs.FileSystem.from_uri("s3://bkt?allow_bucket_creation=true")
    fs.create_dir("bkt")
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, fs


@pytest.fixture()
def project(tmp_path, monkeypatch):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.yaml").write_text(TWO_TRIALS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(project: Path, env: dict, *args: str, timeout: float = 150) -> str:
    """The CLI in its own session (a kill on timeout ends its Ray too), appending to driver.log; its output."""
    start = (project / "driver.log").stat().st_size if (project / "driver.log").exists() else 0
    with open(project / "driver.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "raysweep.sweep.run", *args], cwd=project, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (project / "driver.log").read_bytes()[start:].decode(errors="replace")
    assert proc.returncode == 0, out
    return out


def objects(fs, prefix: str) -> dict[str, int]:
    """key under `prefix` -> mtime_ns of every object there."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:]: i.mtime_ns for i in infos if i.type == pafs.FileType.File}


def read(fs, key: str) -> bytes:
    with fs.open_input_stream(key) as f:
        return f.read()


def assert_no_credentials(fs, *roots: Path) -> None:
    """Neither the key id nor the secret is in any local file under `roots` or any object in the bucket."""
    blobs = [(str(p), p.read_bytes()) for root in roots for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    blobs += [(k, read(fs, f"bkt/{k}")) for k in objects(fs, "bkt")]
    assert len(blobs) > 20
    for where, data in blobs:
        assert KEY_ID.encode() not in data and SECRET.encode() not in data, where


@pytest.fixture()
def ray_tmp():
    """A short temp dir for the CLI's Ray (its socket paths must stay under 107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sweep_on_s3_writes_everything_to_the_bucket_and_reruns_nothing(s3, project, ray_tmp):
    env, fs = s3
    env = {**env, "RAY_TMPDIR": str(ray_tmp)}  # Ray's logs land there, to be searched for credentials
    exp = "bkt/runs/tiny"
    out = run_cli(project, env, "exp=tiny", "storage=s3://bkt/runs")
    assert "2 trials, 0 finished, 2 to run -> s3://bkt/runs/tiny" in out
    assert not (project / "runs").exists()  # nothing landed in the local default storage
    keys = objects(fs, exp)
    trials = pl.from_arrow(pq.read_table(f"{exp}/trials.parquet", filesystem=fs))
    assert trials["status"].to_list() == ["done", "done"]
    tids = trials["trial_id"].to_list()
    losses = pl.from_arrow(pq.read_table(f"{exp}/losses.parquet", filesystem=fs))
    assert losses.group_by("trial_id").agg(pl.col("step").sort())["step"].to_list() == [[1, 2, 3, 4]] * 2
    scores = pl.read_parquet(f"s3://{exp}/scores.parquet")  # polars too finds the server in the environment
    assert scores.height == 2 * 2 * 2 * 4  # trials x checkpoints x conditions x questions
    assert {"config.yaml", "summary.parquet", "completions.parquet", "heldout_logprob.parquet"} <= set(keys)
    for tid in tids:
        done = json.loads(read(fs, f"{exp}/trials/{tid}/done.json"))
        assert done["status"] == "done" and done["node_id"]
        assert not [k for k in keys if k.startswith(f"trials/{tid}/resume")]  # done: its resume state is deleted
        assert {f"trials/{tid}/eval/step_{s}.scores.parquet" for s in (0, 4)} <= set(keys)
        assert {f"adapters/{tid}/step_{s}/adapter_model.safetensors" for s in (0, 4)} <= set(keys)
    assert any("events.out.tfevents" in k for k in keys if k.startswith("tune/"))  # Tune wrote there too
    assert not list((project / "scratch" / "trial").rglob("*.safetensors"))  # finished trials freed the node's disk

    # Any node can use any adapter: the trained one from the bucket loads onto the base model.
    from peft import PeftModel

    from raysweep.train.models import load_model

    local = project / "fetched"
    local.mkdir()
    pafs.copy_files(f"{exp}/adapters/{tids[0]}/step_4", str(local), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    model = PeftModel.from_pretrained(load_model("tiny-random")[0], str(local))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not the zero init

    # Same command from a fresh node (no scratch): nothing trains, no result of a trial is
    # rewritten (its config files are, if the resolved config's text changed with the code).
    shutil.rmtree(project / "scratch")
    out = run_cli(project, env, "exp=tiny", "storage=s3://bkt/runs")
    assert "2 trials, 2 finished, 0 to run" in out

    def results(objs: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in objs.items() if k.startswith(("trials/", "adapters/")) and "/config." not in k}

    assert results(objects(fs, exp)) == results(keys)
    assert pl.from_arrow(pq.read_table(f"{exp}/trials.parquet", filesystem=fs)).height == 2
    assert list(ray_tmp.glob("ray/session_*/logs/*.log"))
    assert_no_credentials(fs, project, ray_tmp)  # Ray's logs included


class Crash(Exception):
    pass


def test_trial_resumes_from_the_bucket_after_its_scratch_is_lost(s3, project, tmp_path):
    _, fs = s3
    slow = TWO_TRIALS.replace("max_steps: 4", "max_steps: 8").replace(
        "checkpoints: final", "checkpoints: final, resume_every: 2")
    (project / "experiments" / "slow.yaml").write_text(slow.split("sweep:")[0] + "sweep:\n  arms: [{defense: {kind: none}}]\n")
    (trial,) = expand(load_config("slow", []))
    store = open_store("s3://bkt/runs", "slow")  # what the driver does before the trials start
    prepare(store.exp_dir, trial.id, trial.config, trial.label)
    store.push("trials")
    exp, tdir = "bkt/runs/slow", f"bkt/runs/slow/trials/{trial.id}"

    def crash_after(step: int):
        def report(metrics: dict) -> None:
            if metrics.get("step") == step:
                raise Crash(step)
        return report

    # The process dies after its state at step 4 was saved (and mirrored).
    with pytest.raises(Crash):
        run_prepared(store.uri, trial.id, report=crash_after(4))
    assert json.loads(read(fs, f"{tdir}/resume.json"))["step"] == 4
    assert "done.json" not in objects(fs, tdir)
    assert {k.split("/")[2] for k in objects(fs, exp) if "/resume_" in k} == {"resume_4"}  # replaced states were deleted
    shutil.rmtree(tmp_path / "scratch")  # the node is gone: only the bucket knows the state

    done = run_prepared(store.uri, trial.id)
    assert done["resumed_from"] == 4  # started from the mirrored state, not from step 0
    assert not list((tmp_path / "scratch").rglob("*.safetensors"))
    keys = objects(fs, exp)
    assert not [k for k in keys if "/resume" in k]  # done: its resume state is deleted from the bucket too
    assert len([k for k in keys if k.startswith(f"trials/{trial.id}/attempts/")]) == 2
    resumed = pl.from_arrow(pq.read_table(f"{tdir}/losses.parquet", filesystem=fs))
    assert resumed["step"].to_list() == list(range(1, 9))  # no step lost or duplicated
    # The resumed run reproduces an uninterrupted one (same batches, same state).
    clean = run_trial(trial.config, tmp_path / "clean", trial.id)
    assert clean["resumed_from"] == 0
    clean_losses = pl.read_parquet(tmp_path / "clean" / "trials" / trial.id / "losses.parquet")
    assert resumed["loss"].to_list() == pytest.approx(clean_losses["loss"].to_list(), rel=1e-5, abs=1e-6)
    assert_no_credentials(fs, tmp_path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unusable_storage_fails_before_anything_runs(s3, project, monkeypatch, capsys):
    _, fs = s3
    # A bucket that does not exist on a reachable server.
    assert main(["exp=tiny", "storage=s3://nobucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "storage='s3://nobucket/runs/tiny' is not reachable or not writable" in err and "bucket" in err.lower()
    # Credentials in the URI are refused, and not echoed.
    assert main(["exp=tiny", f"storage=s3://{KEY_ID}:{SECRET}@bkt/runs"]) == 2
    err = capsys.readouterr().err
    assert "credentials in the environment" in err and SECRET not in err and KEY_ID not in err
    # An endpoint nobody listens on.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port()}")
    t0 = time.time()
    assert main(["exp=tiny", "storage=s3://bkt/runs"]) == 2
    err = capsys.readouterr().err
    assert "storage='s3://bkt/runs/tiny' is not reachable or not writable" in err and SECRET not in err
    assert time.time() - t0 < 60
    # Nothing was written anywhere: no local results or scratch, no object in any bucket.
    assert not (project / "runs").exists() and not (project / "scratch").exists()
    assert objects(fs, "bkt") == {}
