"""A trial as a plain function (no Ray): schedules, PPS during training only, parts on disk, what a finished trial keeps."""

import json
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
    available_experiments,
    load_config,
    trial_fields,
)
from raysweep.sweep.expand import expand
from raysweep.train.step import checkpoint_steps, example_order, total_steps
from raysweep.train.trial import run_trial

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


class Crash(Exception):
    pass


def test_finished_trial_deletes_its_resume_state_unless_kept(tmp_path, tiny):
    """A crash resumes from the saved state; once done, only adapters and tables remain
    (train.keep_resume keeps the state); a leftover of a crash after done.json goes next call."""
    cfg = tiny_config(DefenseConfig())
    cfg = replace(cfg, train=replace(cfg.train, resume_every=1))
    tdir = tmp_path / "trials" / "t"

    def crash_at_1(metrics: dict) -> None:
        if metrics.get("step") == 1:
            raise Crash
    with pytest.raises(Crash):
        run_trial(cfg, tmp_path, "t", report=crash_at_1)
    assert (tdir / "resume.json").is_file() and (tdir / "resume_1" / "state.pt").is_file()
    saves = []
    done = run_trial(cfg, tmp_path, "t", saved=lambda: saves.append(sorted(p.name for p in tdir.iterdir())))
    assert done["resumed_from"] == 1  # the crash-resume state still does its job
    assert "done.json" in saves[-1] and not any(n.startswith(("resume", ".resume")) for n in saves[-1])
    assert not list(tdir.glob("*resume*"))
    assert pl.read_parquet(tdir / "losses.parquet")["step"].to_list() == [1, 2]
    assert {p.name for p in (tdir / "eval").iterdir()} == {
        f"step_{s}.{t}.parquet" for s in (0, 2) for t in ("completions", "scores", "heldout_logprob")}
    assert {p.name for p in (tmp_path / "adapters" / "t").iterdir()} == {"step_0", "step_2"}
    assert all((tmp_path / "adapters" / "t" / s / "adapter_model.safetensors").is_file() for s in ("step_0", "step_2"))

    kept = replace(cfg, train=replace(cfg.train, keep_resume=True))
    run_trial(kept, tmp_path, "k")
    kdir = tmp_path / "trials" / "k"
    assert (kdir / "done.json").is_file() and (kdir / "resume_2" / "state.pt").is_file()
    assert json.loads((kdir / "resume.json").read_text())["step"] == 2
    assert sorted(p.name for p in kdir.glob("resume_*")) == ["resume_2"]

    # A crash between done.json and the clean-up: the next call (a Tune retry) deletes the leftover.
    (kdir / ".resume_3.tmp1").mkdir()
    saves.clear()
    again = run_trial(cfg, tmp_path, "k", saved=lambda: saves.append(1))
    assert again["resumed_from"] == 0 and saves == [1] and not list(kdir.glob("*resume*"))
    run_trial(cfg, tmp_path, "k", saved=lambda: saves.append(2))
    assert saves == [1]  # nothing left to delete: nothing to mirror


def test_keep_resume_and_log_leave_every_trial_id_unchanged():
    """What a finished trial keeps and where metrics go are not what it computes: out of the id."""
    for exp in available_experiments():
        trials = expand(load_config(exp))
        other = expand(load_config(exp, ["train.keep_resume=true", "log.wandb=some-project"]))
        assert [t.id for t in other] == [t.id for t in trials], exp
        for t in trials:  # the hashed fields are those written before the settings existed
            assert "keep_resume" not in trial_fields(t.config)["train"] and "log" not in trial_fields(t.config)
