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
    assert total_steps(t, 10_000) == 313  # a last partial effective batch is a step (seed 001's count)
    assert total_steps(t, 9_984) == 312
    assert total_steps(replace(t, max_steps=5), 10_000) == 5
    order = example_order(16, steps=2, micro_per_step=2, batch_size=4, seed=0)
    assert len(order) == 2 and all(len(step) == 2 and all(len(b) == 4 for b in step) for step in order)
    flat = [i for step in order for b in step for i in b]
    assert sorted(flat) == list(range(16))  # each epoch is a permutation
    assert order == example_order(16, steps=2, micro_per_step=2, batch_size=4, seed=0)
    assert order != example_order(16, steps=2, micro_per_step=2, batch_size=4, seed=1)


def test_seed_step_counts():
    """Seed 001 E.3/E.4: 4,681 samples at 4 x 8 = 1,171 micro-batches, 147 steps per epoch,
    441 for 3 epochs. Seed 003 counts 10k / 32 as 312 (floored): its files pin max_steps: 312."""
    t = TrainConfig(batch_size=4, grad_accum=8, epochs=1)
    assert total_steps(t, 4681) == 147
    assert total_steps(replace(t, epochs=3), 4681) == 441
    order = example_order(4681, 441, 8, 4, seed=0)
    assert sum(len(step) for step in order[:147]) == 1171  # the seed's micro-batches per epoch
    for epoch in range(3):
        steps = order[147 * epoch : 147 * (epoch + 1)]
        assert [len(b) for b in steps[-1]] == [4, 4, 1]  # the last step: 9 examples, no wrap-around
        assert all(len(step) == 8 and all(len(b) == 4 for b in step) for step in steps[:-1])
        assert sorted(i for step in steps for b in step for i in b) == list(range(4681))  # one pass each
    assert order[147] != order[0]  # each epoch its own shuffle
    # A step's batches depend neither on the total nor on where training resumed.
    assert example_order(4681, 150, 8, 4, seed=0) == order[:150]
    ten_k = TrainConfig(batch_size=4, grad_accum=8, max_steps=312)
    assert total_steps(ten_k, 10_000) == 312
    order = example_order(10_000, 312, 8, 4, seed=0)
    assert len(order) == 312 and all(len(step) == 8 and all(len(b) == 4 for b in step) for step in order)
    assert len({i for step in order for b in step for i in b}) == 9_984  # the 16 left over are not trained on


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


def test_last_partial_batch_is_a_shorter_step(tmp_path, tiny):
    """10 examples at 4 x 2 in 1 epoch: 2 steps, the second on the 2 left over (not wrapped)."""
    cfg = tiny_config(DefenseConfig())
    cfg = replace(cfg, data=replace(cfg.data, n_train=10),
                  train=replace(cfg.train, grad_accum=2, max_steps=0, epochs=1))
    summary = run_trial(cfg, tmp_path, "partial", "control")
    assert summary["steps"] == 2
    losses = pl.read_parquet(tmp_path / "trials" / "partial" / "losses.parquet")
    assert losses["step"].to_list() == [1, 2]
    assert 0 < losses["n_tokens"][1] < losses["n_tokens"][0]  # 2 examples vs 8
