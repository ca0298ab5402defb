"""Surviving crashes: a killed driver, a kill during a table write, a multi-node sweep on
loopback that loses a worker node. Each test bounds its own time and cleans up the
processes it started (never `ray stop`, which would end every Ray on the machine).
"""

import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from test_sweep import EXPERIMENT

pytestmark = pytest.mark.integration  # subprocesses and models throughout

RAY = str(Path(sys.executable).parent / "ray")


def cli(project: Path, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """The CLI in a subprocess, its output in <project>/driver.log (a pipe could fill and block it)."""
    log = open(project / "driver.log", "w")
    return subprocess.Popen([sys.executable, "-m", "raysweep.sweep.run", *args], cwd=project, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, project: Path, timeout: float) -> str:
    proc.wait(timeout=timeout)
    return (project / "driver.log").read_text()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def done_markers(exp: Path) -> dict[str, float]:
    return {Path(p).parent.name: os.stat(p).st_mtime for p in glob.glob(str(exp / "trials" / "*" / "done.json"))}


def settle(exp: Path, quiet: float = 3.0, timeout: float = 60) -> None:
    """Wait until nothing under `exp` changes for `quiet` seconds (orphaned workers are gone)."""
    def snapshot():
        return sorted((p, os.stat(p).st_mtime) for p in glob.glob(str(exp / "**"), recursive=True) if os.path.isfile(p))

    deadline = time.time() + timeout
    last, since = snapshot(), time.time()
    while time.time() < deadline:
        time.sleep(0.5)
        now = snapshot()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return
    raise AssertionError("the killed sweep's processes kept writing")


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.yaml").write_text(EXPERIMENT)
    return tmp_path


def test_killed_driver_then_same_command_resumes(project):
    exp = project / "runs" / "tiny"
    driver = cli(project, "exp=tiny", start_new_session=True)
    try:
        wait_for(lambda: 1 <= len(done_markers(exp)) < 5, 300, "a first finished trial")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    settle(exp)
    before = done_markers(exp)
    assert 1 <= len(before) < 5
    assert not (exp / "trials.parquet").exists()  # tables are gathered at the end only

    again = cli(project, "exp=tiny")
    out = finish(again, project, 600)
    assert again.returncode == 0, out
    assert f"5 trials, {len(before)} finished, {5 - len(before)} to run" in out
    after = done_markers(exp)
    assert len(after) == 5 and {k: after[k] for k in before} == before  # finished ones not retrained
    losses = pl.read_parquet(exp / "losses.parquet")
    assert losses.height == 5 * 4 and losses.select("trial_id", "step").is_unique().all()
    for name in ("completions", "scores", "heldout_logprob"):
        t = pl.read_parquet(exp / f"{name}.parquet")
        keys = [c for c in ("trial_id", "step", "condition", "question_id", "sample", "example_id") if c in t.columns]
        assert t.select(keys).is_unique().all(), name


WRITER = """
import sys
from raysweep.tables import write_table
rows = [{"trial_id": "t", "step": i, "loss": float(i), "lr": 0.1, "grad_norm": 1.0, "n_tokens": 7}
        for i in range(200_000)]
print("ready", flush=True)
while True:
    write_table(sys.argv[1], rows, "losses")
"""


def test_kill_during_table_writes_leaves_complete_or_absent(tmp_path):
    target = tmp_path / "losses.parquet"
    for delay in (0.05, 0.2, 0.4, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            table = pq.read_table(target)
            assert table.num_rows == 200_000 and table.column("step")[-1].as_py() == 199_999
    assert target.exists()  # at least one write completed during the longer runs
    leftovers = [p for p in tmp_path.iterdir() if p.name != "losses.parquet"]
    assert all(p.name.startswith(".losses.parquet.") for p in leftovers)  # only hidden temp files


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block` in its own session, its output kept in `log` for failure messages."""
    with open(log, "w") as out:
        return subprocess.Popen([RAY, "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_multi_node_sweep_spreads_and_survives_a_lost_node(project):
    """A head and two worker nodes on loopback (separate processes, 1 CPU each, the head
    none): trials must spread over both workers; one worker is stopped mid-sweep and its
    trial is rescheduled on the remaining node."""
    port = 26379 + os.getpid() % 1000
    # Ray 2.60 authenticates cluster RPCs with a token: every node and the driver share one.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # The session's local Ray sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback only); with it a
    # joining worker node refuses to start ("multi-node clusters are not supported"). These nodes
    # are kept on loopback by --node-ip-address instead.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    status_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}

    def nodes_up(n: int):
        def check() -> bool:
            out = subprocess.run([RAY, "status"], capture_output=True, text=True, env=status_env)
            return out.returncode == 0 and out.stdout.count(" node_") >= n
        return check

    # Every node gets its own fixed ports: Ray's defaults (agent 52365, client server 10001)
    # would collide between nodes on one machine and with the session's local Ray.
    def ports(i: int) -> list[str]:
        base = port + 100 * i
        return [f"--dashboard-agent-listen-port={base + 1}", f"--dashboard-agent-grpc-port={base + 2}",
                f"--metrics-export-port={base + 3}", f"--runtime-env-agent-port={base + 4}",
                f"--node-manager-port={base + 5}", f"--object-manager-port={base + 6}",
                f"--min-worker-port={base + 10}", f"--max-worker-port={base + 60}"]

    logs = project / "nodes"
    logs.mkdir()
    head = start_node(["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                       f"--ray-client-server-port={port + 1}", "--node-ip-address=127.0.0.1", *ports(1)],
                      env, logs / "head.log")
    workers = []
    slow = EXPERIMENT.replace("max_steps: 4", "max_steps: 16").replace("checkpoints: final", "checkpoints: final, resume_every: 2")
    (project / "experiments" / "tiny.yaml").write_text(slow)
    exp = project / "runs" / "tiny"
    driver = None
    try:
        wait_for(nodes_up(1), 120, "the head node")
        for n in (2, 3):  # one at a time; a worker start that hangs under load is retried
            for attempt in range(3):
                log = logs / f"worker{n}-{attempt}.log"
                worker = start_node([f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                     "--node-ip-address=127.0.0.1", *ports(n)], env, log)
                try:
                    wait_for(nodes_up(n), 60, f"{n} Ray nodes")
                    workers.append(worker)
                    break
                except AssertionError as e:
                    stop_node(worker)
                    if attempt == 2:
                        raise AssertionError(f"{e}\nworker log:\n{tail(log)}\nhead log:\n{tail(logs / 'head.log')}") from None
        driver = cli(project, "exp=tiny", env=status_env)
        # Stop the worker node of a running trial once it has saved some state.
        def running_pids():
            return [int((Path(p).parent / "pid").read_text()) for p in glob.glob(str(exp / "trials" / "*" / "resume.json"))
                    if not (Path(p).parent / "done.json").exists() and json.loads(Path(p).read_text())["step"] >= 4]
        try:
            wait_for(lambda: running_pids(), 300, "a running trial with saved state")
        except AssertionError as e:
            raise AssertionError(f"{e}\ndriver log:\n{tail(project / 'driver.log')}") from None
        victim_pid = running_pids()[0]
        victim = next(w for w in workers if victim_pid in _descendants(w.pid))
        stop_node(victim)
        out = finish(driver, project, 900)
        assert driver.returncode == 0, out
    finally:
        if driver and driver.poll() is None:
            driver.kill()
        for proc in workers + [head]:
            stop_node(proc)
    infos = [json.loads(p.read_text()) for p in (exp / "trials").glob("*/done.json")]
    assert len(infos) == 5
    attempts = {d.parent.name: [json.loads(a.read_text())["node_id"] for a in sorted(d.glob("*.json"))]
                for d in (exp / "trials").glob("*/attempts")}
    assert len({n for nodes in attempts.values() for n in nodes}) >= 2  # trials ran on more than one node
    moved = [t for t, nodes in attempts.items() if len(set(nodes)) >= 2]
    assert moved  # the lost node's trial was rescheduled on the other node ...
    done = {i["trial_id"]: i for i in infos}
    assert all(done[t]["resumed_from"] > 0 for t in moved)  # ... and resumed from its saved state
    losses = pl.read_parquet(exp / "losses.parquet")
    assert losses.height == 5 * 16 and losses.select("trial_id", "step").is_unique().all()


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(out[::2], out[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    seen, stack = set(), [pid]
    while stack:
        p = stack.pop()
        for c in children.get(p, []):
            if c not in seen:
                seen.add(c)
                stack.append(c)
    return seen


def test_dashboard_lists_the_running_sweeps_trial_actors(project):
    """dashboard=true: the local Ray serves its dashboard on loopback, the URL is printed,
    and the dashboard's state API lists the sweep's trial actors while they run."""
    import re
    import urllib.request

    slow = EXPERIMENT.replace("max_steps: 4", "max_steps: 40")
    (project / "experiments" / "tiny.yaml").write_text(slow)
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    driver = cli(project, "exp=tiny", "dashboard=true", env=env, start_new_session=True)
    log = project / "driver.log"
    try:
        wait_for(lambda: "Ray dashboard: http://" in log.read_text(), 180, "the dashboard URL")
        url = re.search(r"Ray dashboard: (http://\S+)", log.read_text()).group(1)
        assert url.startswith("http://127.0.0.1:")  # bound to loopback only

        def trial_actors() -> list[dict]:
            req = urllib.request.Request(f"{url}/api/v0/actors?limit=1000&detail=1",
                                         headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    data = json.loads(resp.read())
            except OSError:
                return []
            actors = data["data"]["result"]["result"]
            return [a for a in actors if "ImplicitFunc" in a.get("class_name", "") and a.get("state") == "ALIVE"]

        wait_for(lambda: len(trial_actors()) >= 1, 180, "trial actors in the dashboard")
        # Without the token the dashboard refuses (the secret is needed, and never printed).
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/api/v0/actors", timeout=10)
        assert token not in log.read_text()
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    settle(project / "runs" / "tiny")
