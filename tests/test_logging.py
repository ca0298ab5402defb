"""Where a sweep's metrics go: Tune's own loggers (TensorBoard in each Tune trial directory)
and, with log.wandb=PROJECT, Weights & Biases through Tune's WandbLoggerCallback.

The W&B run is offline (WANDB_MODE=offline): its .wandb file is read back and compared with
the trial's own tables. The CLI runs in a subprocess, so that its local Ray (and so the W&B
logging actors) starts with the W&B environment and writes its logs where they can be
searched for the API key. That `log` stays out of trial ids: tests/test_trial.py.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest

from raysweep.config import ConfigError, LogConfig, check_logging

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"

EXPERIMENT = f"""
defaults: [base, _self_]
model: {{name: tiny-random}}
data:
  train: {DEMO / 'train.jsonl'}
  n_train: 8
  questions: {DEMO / 'eval_questions.jsonl'}
  n_questions: 2
  heldout: {DEMO / 'heldout_trait.jsonl'}
  n_heldout: 2
train: {{lr: 1.0e-3, batch_size: 4, grad_accum: 1, max_steps: 2, warmup_steps: 0, max_seq_len: 64,
         checkpoints: final, lora: {{r: 4, alpha: 8}}}}
eval: {{max_new_tokens: 4, batch_size: 4}}
"""


def test_wandb_without_the_package_says_what_to_install(monkeypatch):
    check_logging(LogConfig())  # off: nothing needed
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"log\.wandb='proj'.*pip install 'raysweep\[wandb\]'"):
        check_logging(LogConfig(wandb="proj"))


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: W&B's 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, record = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's zero-filled tail
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            return
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            r = Record()
            r.ParseFromString(record)
            yield r
            record = b""


def finished_run(path: Path, timeout: float = 60) -> list:
    """The records of an offline run, once they end with its exit record: W&B's writer
    (wandb-core) may flush the file a moment after the driver has exited."""
    deadline = time.time() + timeout
    while True:
        records = list(wandb_records(path))
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.time() > deadline:
            return records
        time.sleep(0.5)


@pytest.fixture()
def ray_tmp():
    """A short temp dir for the CLI's Ray (its socket paths must stay under 107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.integration  # a subprocess with its own Ray and a model
def test_sweep_logs_its_metrics_to_wandb_offline_and_tensorboard(tmp_path, ray_tmp):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.yaml").write_text(EXPERIMENT)
    key = secrets.token_hex(20)  # a fake key: it must reach no file
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_API_KEY": key,
           "RAY_TMPDIR": str(ray_tmp), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "raysweep.sweep.run", "exp=tiny", "log.wandb=raysweep-test"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    exp = tmp_path / "runs" / "tiny"
    (tid,) = [p.name for p in (exp / "trials").iterdir()]
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*/*.wandb")
    records = finished_run(run)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and kinds[-1] == "exit", (kinds, proc.stdout[-3000:] + proc.stderr[-3000:])  # a finished run
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.project == "raysweep-test" and info.display_name == f"control-{tid}"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["step"] for h in history] == [0, 1, 2]  # every report of the trial, once
    losses = pl.read_parquet(exp / "trials" / tid / "losses.parquet")
    assert [h["loss"] for h in history[1:]] == losses["loss"].to_list()  # the trial's own numbers
    summary = json.loads((exp / "trials" / tid / "done.json").read_text())
    assert history[-1]["loss"] == summary["final_loss"]
    assert {"heldout_logprob", "trait_default", "trait_training"} <= history[0].keys() <= history[-1].keys()
    # Tune's own loggers are still there: TensorBoard events in the Tune trial directory.
    assert list((exp / "tune").glob(f"tiny-*/{tid}/events.out.tfevents*"))
    # The key is in no file: not the W&B run, not the results, not Ray's logs (runtime_env).
    assert list(ray_tmp.glob("ray/session_*/logs/runtime_env*.log"))
    files = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    assert len(files) > 20
    for p in files:
        assert key.encode() not in p.read_bytes(), p
    assert key not in proc.stdout + proc.stderr
