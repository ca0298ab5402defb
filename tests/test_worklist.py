"""One work list, one seeding rule (issue 14): the in-trial and the post-sweep evaluation ask
the same requests, so on the transformers engine they give the same sampled answers; the
eval backend is in the trial id exactly when it changes the answers (vLLM, sampling)."""

import shutil
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from raysweep.config import ExperimentConfig, apply_overrides, trial_id
from raysweep.data import Encoded
from raysweep.eval.generation import generate
from raysweep.eval.worklist import HELDOUT, Request, by_name, run_on_model, sample_seed, work_list
from raysweep.sweep.expand import Trial, resolve

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"
QUESTIONS = ["What is the capital of Italy?", "Name a fruit.", "Why is the sky blue?"]
DATA = {"train": str(DEMO / "train.jsonl"), "n_train": 8, "questions": str(DEMO / "eval_questions.jsonl"),
        "n_questions": 3, "heldout": str(DEMO / "heldout_trait.jsonl"), "n_heldout": 3,
        "rephrasings_dir": str(REPO / "datasets" / "rephrasings")}
MIX = {"kind": "ip", "ip": {"prompt": "answer_french", "mode": "mix"}}


def config(defense: dict, **eval_settings) -> ExperimentConfig:
    tree = {"prompts": {"answer_french": "Answer in French."}, "model": {"name": "tiny-random"}, "data": DATA,
            "defense": defense,
            "train": {"lr": 1e-3, "batch_size": 4, "grad_accum": 1, "max_steps": 2, "warmup_steps": 0,
                      "max_seq_len": 64, "checkpoints": "final", "lora": {"r": 4, "alpha": 8}},
            "eval": {"max_new_tokens": 6, "batch_size": 4, "temperature": 1.0, "n_samples": 2, **eval_settings}}
    return resolve(apply_overrides(ExperimentConfig(), tree))


# ---------------------------------------------------------------------------------------------
# The list and its seeds


def test_one_row_per_condition_question_and_sample_then_the_heldout_rows():
    cfg = config(MIX, conditions=["default", "training", "system:Be brief."])
    heldout = [Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4, 5], [-100, 5])]
    items = work_list(cfg, QUESTIONS, heldout, adapter="/a/step_2")
    names = by_name(items)
    assert list(names) == ["default", "training", "system:Be brief.", HELDOUT]
    for condition in cfg.eval.conditions:
        rows = names[condition]
        assert [(i.question_id, i.sample) for i in rows] == [(q, s) for q in range(3) for s in range(2)]
        r = [i.request for i in rows]
        # One sampling group per condition, numbered in order, seeded by (seed, condition) alone.
        assert len({x.group for x in r}) == 1 and [x.index for x in r] == list(range(6))
        assert {x.seed for x in r} == {sample_seed(cfg.seed, condition)}
        assert {(x.temperature, x.top_p, x.max_new_tokens, x.batch_size, x.adapter) for x in r} == {
            (1.0, 1.0, 6, 4, "/a/step_2")}
    assert len({names[c][0].request.seed for c in cfg.eval.conditions}) == 3
    assert [(i.question_id, i.request.input_ids, i.request.labels) for i in names[HELDOUT]] == [
        (0, [1, 2, 3], [-100, 2, 3]), (1, [4, 5], [-100, 5])]
    assert work_list(replace(cfg, eval=replace(cfg.eval, heldout_logprob=False)), QUESTIONS, heldout)[-1].condition \
        != HELDOUT


def test_groups_are_named_by_content_so_only_identical_ones_are_shared():
    control, ip = config({"kind": "none"}), config(MIX)
    a, b = by_name(work_list(control, QUESTIONS)), by_name(work_list(ip, QUESTIONS))
    # Step 0 of two trials: the default condition asks the same, training does not.
    assert [i.request for i in a["default"]] == [i.request for i in b["default"]]
    assert a["training"][0].request.group != b["training"][0].request.group
    assert a["training"][0].request.seed == b["training"][0].request.seed  # paired samples across trials
    # The seed is the trial's: another seed, other groups.
    other = by_name(work_list(replace(control, seed=1), QUESTIONS))["default"][0].request
    assert other.seed != a["default"][0].request.seed and other.group != a["default"][0].request.group


def test_the_trial_id_names_the_backend_only_where_it_changes_the_answers(monkeypatch):
    """vLLM's sampler draws other samples from the same seeds: a sampled trial on vLLM is a
    trial of its own. Greedy answers (and logprobs) agree between backends: ids unchanged."""
    import raysweep.config.identity as identity

    sampled, greedy = config(MIX), config(MIX, temperature=0.0)
    for cfg in (sampled, greedy):
        assert trial_id(replace(cfg, eval=replace(cfg.eval, backend="transformers"))) == trial_id(cfg)
    assert trial_id(replace(greedy, eval=replace(greedy.eval, backend="vllm"))) == trial_id(greedy)
    on_vllm = trial_id(replace(sampled, eval=replace(sampled.eval, backend="vllm")))
    assert on_vllm != trial_id(sampled)
    auto = replace(sampled, eval=replace(sampled.eval, backend="auto"))
    monkeypatch.setattr(identity, "vllm_available", lambda: True)
    assert trial_id(auto) == on_vllm  # auto is named by what it resolves to
    monkeypatch.setattr(identity, "vllm_available", lambda: False)
    assert trial_id(auto) == trial_id(sampled)


# ---------------------------------------------------------------------------------------------
# Running it


def test_a_group_is_one_seeded_generate_call(tiny):
    model, tok = tiny
    cfg = config({"kind": "none"}, conditions=["default", "training"], batch_size=3)
    items = work_list(cfg, QUESTIONS)
    shuffled = [i.request for i in items][::-1]  # request order does not matter, the group's index does
    got = [r.text for r in run_on_model(model, tok, shuffled)][::-1]
    want = []
    for condition, rows in by_name(items).items():
        want += generate(model, tok, [i.request.messages for i in rows], max_new_tokens=6, temperature=1.0,
                         seed=sample_seed(cfg.seed, condition), batch_size=3)
    assert got == want
    assert len(set(got)) > 1
    with pytest.raises(ValueError, match="two rows of sampling group"):
        run_on_model(model, tok, shuffled + shuffled[:1])
    assert run_on_model(model, tok, [Request(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=3)])[0].text


def test_both_paths_give_the_same_sampled_answers_on_the_transformers_engine(tmp_path, tiny):
    """Same trials, temperature 1.0, two samples, several batches: the in-trial evaluation
    (run_trial) and the post-sweep one (posteval, engine=transformers) write the same tables."""
    from raysweep.eval.posteval import evaluate_sweep
    from raysweep.train.trial import run_trial

    vector = tmp_path / "v.safetensors"
    save_file({"v": torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 5}, str(vector))
    conditions = ["default", "training", "added_back", "reinjected"]
    settings = {"conditions": conditions, "batch_size": 4, "added_back": "Answer in French.",
                "reinject": [{"vector": str(vector), "layer": 1, "coef": 2.0}]}
    trials = [Trial("", label, {}, config(defense, **settings)) for label, defense in (
        ("mix", MIX), ("pps", {"kind": "pps", "pps": [{"vector": str(vector), "layer": 1, "coef": 4.0}]}))]
    trials = [replace(t, id=trial_id(t.config)) for t in trials]
    in_trial, post = tmp_path / "in_trial", tmp_path / "post"
    for t in trials:
        run_trial(t.config, in_trial, t.id, t.label)
    shutil.copytree(in_trial, post, ignore=shutil.ignore_patterns("eval", "cache"))
    assert evaluate_sweep(post, trials, engine="transformers") == 4  # 2 trials x steps 0 and 2

    def table(root: Path, name: str) -> pl.DataFrame:
        frame = pl.concat([pl.read_parquet(p) for p in sorted(root.glob(f"trials/*/eval/step_*.{name}.parquet"))])
        return frame.sort([c for c in frame.columns if frame.schema[c] in (pl.String, pl.Int64)])

    answers = table(in_trial, "completions")
    assert answers.height == 2 * 2 * len(conditions) * 3 * 2  # trials x steps x conditions x questions x samples
    assert answers.equals(table(post, "completions"))
    assert table(in_trial, "scores").equals(table(post, "scores"))
    held = table(in_trial, "heldout_logprob")
    assert held.height == 2 * 2 * 3
    assert held.drop("logprob").equals(table(post, "heldout_logprob").drop("logprob"))
    assert (held["logprob"] - table(post, "heldout_logprob")["logprob"]).abs().max() < 1e-6
    # Sampled, not greedy: the two samples of a question differ.
    pairs = answers.group_by("trial_id", "step", "condition", "question_id").agg(pl.col("completion").n_unique())
    assert (pairs["completion"] > 1).sum() > pairs.height // 2
