"""`python -m raysweep.mech exp=pps_vs_ip_tiny` end to end on CPU: every analysis writes its
documented table; config errors name the key."""

import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from raysweep.config import ConfigError, SteerConfig, load_config
from raysweep.train.defenses import read_vector
from raysweep.mech.config import MechCondition, MechConfig, validate
from raysweep.tables import SCHEMAS

pytestmark = pytest.mark.integration  # subprocesses and models throughout

REPO = Path(__file__).resolve().parents[1]


def test_tiny_experiment_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "raysweep.mech", "exp=pps_vs_ip_tiny", f"storage={tmp_path}", "mech.n=2", "threads=1"]
    out = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    d = tmp_path / "pps_vs_ip_tiny" / "mech"
    for name in ("vector_samples", "grad_cosine", "loss", "grad_pca", "grad_pca_cosine", "grad_pca_scores",
                 "ip_pps_similarity", "projection"):
        assert pq.read_schema(d / f"{name}.parquet").equals(SCHEMAS[f"mech_{name}"]), name
    assert (d / "mech.yaml").is_file()
    # The vectors the stage made are pps-ready [num_layers+1, hidden] files.
    for v in ("french", "french_random", "ip_diff"):
        assert read_vector(SteerConfig(vector=str(d / "vectors" / f"{v}.safetensors"), layer=1), 2, 64).shape == (64,)
    loss = pl.read_parquet(d / "loss.parquet")
    by = {c: loss.filter(pl.col("condition") == c).sort("sequence_id")["loss"].to_list() for c in loss["condition"].unique()}
    assert by["pps_ipdiff@0"] == by["none"]  # steering with coefficient 0 is the plain pass
    assert by["pps@4"] != by["none"] and by["ip"] != by["none"]
    cos = pl.read_parquet(d / "grad_cosine.parquet")
    assert set(cos["vector"]) == {"french", "french_random", "ip_diff"} and cos["cosine"].is_between(-1, 1).all()
    assert set(cos["coef"].unique()) >= {0.5, 1.5, 4.0}
    sweep = cos.filter(pl.col("condition").str.starts_with("ip_pps@"))
    assert set(sweep["ip"]) == {"answer_french"}  # the intensity sweep with IP on
    pca = pl.read_parquet(d / "grad_pca.parquet")
    assert set(pca["defended"]) == {"pps@0.5", "pps@1.5", "pps@4", "ip"}
    sim = pl.read_parquet(d / "ip_pps_similarity.parquet")
    assert set(sim["coef"]) == {0.0, 1.0, 2.0} and (sim["n_tokens"] > 0).all()
    proj = pl.read_parquet(d / "projection.parquet")
    assert proj.height == 2 * 2 * 3  # sequences x layers x compare vectors
    # The report draws the gradient-cosine scatter and the intensity sweep from these tables.
    from raysweep.report.page import build_report

    index, failures = build_report(tmp_path / "pps_vs_ip_tiny")
    assert not failures
    for name in ("grad_cosine", "intensity"):
        assert (index.parent / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{name}.html" in index.read_text()


def test_mech_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="mech.analyses: unknown analysis 'nope'"):
        load_config("pps_vs_ip_tiny", ["mech.analyses=[nope]"])
    with pytest.raises(ConfigError, match="mech.pca_baseline: no condition named 'nobody'"):
        load_config("pps_vs_ip_tiny", ["mech.pca_baseline=nobody"])
    conds = [MechCondition(name="none"), MechCondition(name="ip", ip=["missing"])]
    with pytest.raises(ConfigError, match=r"mech.conditions\[1\].ip: 'missing' is not a key of `prompts`"):
        validate(MechConfig(conditions=conds), {"answer_french": "Answer in French."})
    with pytest.raises(ConfigError, match=r"mech.conditions\[0\].name='none': every condition needs a unique name"):
        validate(MechConfig(conditions=[conds[0], conds[0]]), {})
    out = subprocess.run([sys.executable, "-m", "raysweep.mech", "exp=pps_vs_ip_tiny", "mech.compare=[ghost]",
                          "dry_run=true"], cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "vector 'ghost' is neither in mech.vectors" in out.stderr


def test_analyses_over_training_checkpoints(tmp_path):
    """mech.adapter_runs: gradient cosines, losses and projections at every saved step of a trial
    (001 Fig. 11 and Fig. 6); step 0's adapter is the identity, so it reproduces the base model."""
    from dataclasses import replace

    from safetensors.torch import save_file
    from test_trial import tiny_config

    from raysweep.config import DefenseConfig
    from raysweep.mech.config import MechSteer
    from raysweep.mech.stage import run_stage
    from raysweep.train.trial import run_trial

    cfg = tiny_config(DefenseConfig())
    cfg = replace(cfg, train=replace(cfg.train, checkpoints="pow2", lr=1e-2), eval=replace(cfg.eval, steps=[0]))
    run_trial(cfg, tmp_path, "t1")
    save_file({"v": torch.randn(3, 64, generator=torch.Generator().manual_seed(0))}, str(tmp_path / "v.safetensors"))
    mech = MechConfig(analyses=["grad_cosine", "projection"], data=cfg.data.train, n=2, max_len=64, batch_size=2,
                      vectors={"v": str(tmp_path / "v.safetensors")},
                      conditions=[MechCondition(name="none"), MechCondition(name="pps", steer=[MechSteer(vector="v", layers=[1])])],
                      adapter_runs=[str(tmp_path / "adapters" / "t1")])
    run_stage(replace(cfg, name="m", mech=mech), tmp_path / "out")
    d = tmp_path / "out" / "mech"
    loss = pl.read_parquet(d / "loss.parquet")
    assert set(loss["model"]) == {"base", "t1/step_0", "t1/step_1", "t1/step_2"}

    def of(model, table=loss, col="loss"):
        keys = [k for k in ("condition", "sequence_id", "layer", "vector") if k in table.columns]
        return table.filter(pl.col("model") == model).sort(keys)[col].to_list()

    assert of("t1/step_0") == of("base")
    assert of("t1/step_2") != of("base")
    proj = pl.read_parquet(d / "projection.parquet")
    assert of("t1/step_0", proj, "projection") == of("base", proj, "projection")
    assert of("t1/step_2", proj, "projection") != of("base", proj, "projection")
    with pytest.raises(ConfigError, match="no step_<n> adapter folders"):
        run_stage(replace(cfg, name="m", mech=replace(mech, adapter_runs=[str(tmp_path)])), tmp_path / "out")
