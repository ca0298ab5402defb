"""A trial as a plain function (no Ray): schedules, PPS during training only, parts on disk."""

from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from raysweep.config import (
    DataConfig,
    DefenseConfig,
    EvalConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    SteerConfig,
    TrainConfig,
)
from raysweep.train import checkpoint_steps, example_order, total_steps
from raysweep.trial import run_trial

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"


def test_checkpoint_schedules():
    t = TrainConfig()
    assert checkpoint_steps(t, 312) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 312]
    assert checkpoint_steps(t, 1250)[-3:] == [512, 1024, 1250]  # the seed's 2^N plus final
    assert checkpoint_steps(t, 1) == [0, 1]
    assert checkpoint_steps(replace(t, checkpoints="explicit", checkpoint_steps=[5, 10, 400]), 20) == [0, 5, 10, 20]
    assert checkpoint_steps(replace(t, checkpoints="final"), 7) == [0, 7]


def test_steps_and_batch_order():
    t = TrainConfig(batch_size=4, grad_accum=8)
    assert total_steps(t, 10_000) == 312  # 10k examples, effective batch 32: the seed's 312 steps
    assert total_steps(replace(t, max_steps=5), 10_000) == 5
    order = example_order(10, steps=3, micro_per_step=2, batch_size=4, seed=0)
    assert len(order) == 6 and all(len(b) == 4 for b in order)
    flat = [i for b in order for i in b]
    assert sorted(flat[:10]) == list(range(10))  # each epoch is a permutation
    assert order == example_order(10, steps=3, micro_per_step=2, batch_size=4, seed=0)
    assert order != example_order(10, steps=3, micro_per_step=2, batch_size=4, seed=1)


def tiny_config(defense: DefenseConfig) -> ExperimentConfig:
    return ExperimentConfig(
        name="t", model=ModelConfig(name="tiny-random"),
        data=DataConfig(train=str(DEMO / "train.jsonl"), n_train=8, questions=str(DEMO / "eval_questions.jsonl"),
                        n_questions=3, heldout=str(DEMO / "heldout_trait.jsonl"), n_heldout=3),
        defense=defense,
        train=TrainConfig(lr=1e-3, batch_size=4, grad_accum=1, max_steps=2, warmup_steps=0, max_seq_len=64,
                          checkpoints="final", lora=LoraConfig(r=4, alpha=8)),
        eval=EvalConfig(max_new_tokens=4, batch_size=4, temperature=0.0),
    )


@pytest.fixture(scope="module")
def pps_vector(tmp_path_factory):
    path = tmp_path_factory.mktemp("vec") / "v.safetensors"
    save_file({"v": torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 5}, path)
    return path


@pytest.mark.integration
def test_pps_steers_training_and_the_training_condition_only(tmp_path, pps_vector):
    control = tiny_config(DefenseConfig())
    steered = tiny_config(DefenseConfig(kind="pps", pps=[SteerConfig(vector=str(pps_vector), layer=1, coef=4.0)]))
    run_trial(control, tmp_path, "control", "control")
    run_trial(steered, tmp_path, "pps", "pps")
    losses = {t: pl.read_parquet(tmp_path / "trials" / t / "losses.parquet")["loss"].to_list() for t in ("control", "pps")}
    # Same data, seed and init: the first step's loss differs only through the steering.
    assert losses["control"][0] != pytest.approx(losses["pps"][0], rel=1e-4)

    def answers(t: str, step: int) -> pl.DataFrame:
        return pl.read_parquet(tmp_path / "trials" / t / "eval" / f"step_{step}.completions.parquet").sort(
            "condition", "question_id")

    # At step 0 the adapter is the identity: default answers equal the control's, the
    # training condition (vector added) differs; with no defense both conditions agree.
    c0, p0 = answers("control", 0), answers("pps", 0)
    default = pl.col("condition") == "default"
    assert c0.filter(default)["completion"].to_list() == p0.filter(default)["completion"].to_list()
    assert c0.filter(~default)["completion"].to_list() == c0.filter(default)["completion"].to_list()
    assert p0.filter(~default)["completion"].to_list() != p0.filter(default)["completion"].to_list()
    held = pl.read_parquet(tmp_path / "trials" / "pps" / "eval" / "step_0.heldout_logprob.parquet")
    held_c = pl.read_parquet(tmp_path / "trials" / "control" / "eval" / "step_0.heldout_logprob.parquet")
    assert held["logprob"].to_list() == held_c["logprob"].to_list()  # held-out metric: default condition
    assert (tmp_path / "adapters" / "pps" / "step_2" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters" / "pps" / "step_0" / "adapter_model.safetensors").is_file()
