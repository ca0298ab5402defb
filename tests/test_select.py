"""Heuristic-guided sweeps (sweep.select, raysweep/sweep/select.py): the ranking and the draws,
trial identity, bad settings, the predicted-vs-observed statistics; then a selecting sweep on
the tiny model on a real local Ray (heuristics stage, training, re-run, report in Chromium)
and an elicitation ranking as a dry run."""

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats

from raysweep.analysis import prediction, prediction_fit
from raysweep.config import load_config
from raysweep.errors import ConfigError
from raysweep.sweep.expand import expand
from raysweep.sweep.run import main
from raysweep.sweep.select import candidates, check, rank, selected_config
from raysweep.tables import write_table
from test_storage import endpoint, s3  # noqa: F401 (fixtures: a moto S3 server, a bucket)
from tiers import heavy

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets" / "french_demo"

PROMPTS = {"answer_french": "Answer in French.", "the_sky_is_blue": "The sky is blue.",
           "speak_french": "Speak French.", "reponds": "Réponds en français.", "i_like_cats": "I like cats.",
           "be_concise": "Be concise.", "clown": "You are a clown."}

EXPERIMENT = f"""
defaults: [base, _self_]
model: {{name: tiny-random}}
neutral_prompt: the_sky_is_blue
prompts: {PROMPTS}
prompt_groups:
  french: [answer_french, speak_french, reponds]
  other: [the_sky_is_blue, i_like_cats, be_concise, clown]
data:
  train: {DEMO / 'train.jsonl'}
  n_train: 8
  questions: {DEMO / 'eval_questions.jsonl'}
  n_questions: 4
  heldout: {DEMO / 'heldout_trait.jsonl'}
  n_heldout: 2
train: {{lr: 1.0e-3, batch_size: 4, grad_accum: 1, max_steps: 2, warmup_steps: 0, max_seq_len: 96,
         checkpoints: final, lora: {{r: 4, alpha: 8}}}}
eval: {{max_new_tokens: 6, batch_size: 8}}
heuristics:
  train: {DEMO / 'train.jsonl'}
  n_train: 4
  control: {DEMO / 'control.jsonl'}
  n_control: 2
  variants: [fixed]
  metrics: [scalar]
sweep:
  arms:
    - defense: {{kind: none}}
    - defense: {{kind: ip, ip: {{prompt: [french, other], mode: fixed}}}}
  select: {{heuristic: ph_fixed, top: 2, bottom: 1, random: 1, seed: 0}}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    (root / "experiments").mkdir()
    (root / "experiments" / "sel.yaml").write_text(EXPERIMENT)
    return root


def cfg_of(project, *overrides):
    return load_config("sel", list(overrides), directory=project / "experiments")


# --- ranking and draws (unit) ----------------------------------------------------------


def test_candidates_are_the_prompt_axes_with_groups_expanded(project):
    cfg = cfg_of(project)
    assert candidates(cfg) == ["answer_french", "speak_french", "reponds", "the_sky_is_blue", "i_like_cats",
                               "be_concise", "clown"]
    assert check(cfg) == candidates(cfg)


def test_ranking_follows_the_heuristic_and_breaks_ties_by_prompt_key(project):
    cfg = cfg_of(project, "sweep.select.random=0")
    values = {"answer_french": 0.9, "speak_french": 0.5, "reponds": 0.5, "the_sky_is_blue": 0.7, "i_like_cats": 0.1,
              "be_concise": 0.5, "clown": -0.2}
    cands = candidates(cfg)
    rows = rank(values, cfg, cands)
    assert [r["prompt"] for r in rows] == ["answer_french", "the_sky_is_blue", "be_concise", "reponds",
                                           "speak_french", "i_like_cats", "clown"]  # ties: by key
    assert [r["rank"] for r in rows] == list(range(1, 8))
    # The same values listed in any order rank the same.
    for seed in range(5):
        shuffled = list(np.random.default_rng(seed).permutation(cands))
        assert rank(values, cfg, shuffled) == rows
    got = {r["prompt"]: r["selected_as"] for r in rows}
    # The neutral prompt is a control: never counted as top though it ranks second.
    assert got == {"answer_french": "top", "the_sky_is_blue": "control", "be_concise": "top", "reponds": "not",
                   "speak_french": "not", "i_like_cats": "not", "clown": "bottom"}
    asc = {r["prompt"]: r["selected_as"] for r in rank(values, cfg_of(project, "sweep.select.random=0",
                                                                     "sweep.select.order=asc"), cands)}
    assert asc["clown"] == "top" and asc["i_like_cats"] == "top" and asc["answer_french"] == "bottom"


def test_bottom_and_random_controls_are_drawn_as_configured(project):
    cands = None
    draws = set()
    values = {"answer_french": 0.9, "speak_french": 0.8, "reponds": 0.6, "the_sky_is_blue": 0.7, "i_like_cats": 0.1,
              "be_concise": 0.3, "clown": float("nan")}
    for seed in range(12):
        cfg = cfg_of(project, "sweep.select.top=1", "sweep.select.bottom=2", "sweep.select.random=1",
                     f"sweep.select.seed={seed}", "sweep.select.keep=[be_concise]")
        cands = candidates(cfg)
        rows = rank(values, cfg, cands)
        assert rows == rank(values, cfg, cands)  # seeded: the same draw every time
        by = {a: sorted(r["prompt"] for r in rows if r["selected_as"] == a) for a in ("top", "bottom", "random",
                                                                                     "control", "not")}
        assert by["top"] == ["answer_french"]
        assert by["control"] == ["be_concise", "the_sky_is_blue"]  # neutral + keep, whatever their rank
        assert by["bottom"] == ["i_like_cats", "reponds"]  # the two lowest ranked that are not controls
        assert len(by["random"]) == 1 and by["random"][0] in {"speak_french"}  # the only ranked rest
        # A candidate without a value is never drawn and has no rank.
        nan_row = next(r for r in rows if r["prompt"] == "clown")
        assert nan_row["rank"] is None and nan_row["selected_as"] == "not"
    values["clown"] = 0.75
    for seed in range(12):
        cfg = cfg_of(project, "sweep.select.top=1", "sweep.select.bottom=1", "sweep.select.random=2",
                     f"sweep.select.seed={seed}")
        rows = rank(values, cfg, candidates(cfg))
        drawn = tuple(sorted(r["prompt"] for r in rows if r["selected_as"] == "random"))
        assert len(drawn) == 2 and not set(drawn) & {"answer_french", "i_like_cats", "the_sky_is_blue"}
        draws.add(drawn)
    assert len(draws) > 1  # the seed decides the draw


def test_selected_trials_are_the_plain_grids_trials_of_those_prompts(project):
    cfg = cfg_of(project)
    chosen = {"answer_french", "the_sky_is_blue", "clown"}
    picked = expand(selected_config(cfg, chosen))
    plain = expand(cfg_of(project, "sweep.select.heuristic=",
                          "sweep.arms=[{defense: {kind: none}}, {defense: {kind: ip, ip: {prompt: "
                          "[answer_french, the_sky_is_blue, clown], mode: fixed}}}]"))
    assert sorted(t.id for t in picked) == sorted(t.id for t in plain)
    assert {t.label for t in picked} == {"control", "answer_french/fixed", "the_sky_is_blue/fixed", "clown/fixed"}
    # ... and both are the full grid's trials of those prompts.
    full = {t.id for t in expand(cfg)}
    assert {t.id for t in picked} <= full and len(full) == 8


@pytest.mark.parametrize("override, named", [
    ("sweep.select.heuristic=ph_fixd", "sweep.select.heuristic='ph_fixd'"),
    ("sweep.select.heuristic=ppd_mix", "sweep.select.heuristic='ppd_mix'"),  # mix is not a variant here
    ("sweep.select.top=9", "top + bottom + random = 11"),
    ("sweep.select.keep=[nope]", "sweep.select.keep"),
    ("sweep.select.order=up", "sweep.select.order"),
])
def test_bad_select_settings_exit_2_naming_the_key(project, monkeypatch, capsys, override, named):
    monkeypatch.chdir(project)
    assert main(["exp=sel", override]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not (project / "runs").exists()  # nothing written
    if "ph_fixd" in override:
        assert "did you mean ph_fixed" in err


def test_check_rejects_an_experiment_with_no_prompt_axis(project):
    with pytest.raises(ConfigError, match="no arm has a defense.ip.prompt axis"):
        check(cfg_of(project, "sweep.arms=[{defense: {kind: none}}]"))
    with pytest.raises(ConfigError, match="elicitation needs eval.conditions"):
        check(cfg_of(project, "sweep.select.heuristic=elicitation", "eval.conditions=[default]"))


def test_values_from_an_earlier_heuristics_run(project, tmp_path, capsys):
    from raysweep.sweep.select import select

    run = tmp_path / "heur"
    vals = {"answer_french": 0.4, "speak_french": 0.3, "reponds": 0.2, "the_sky_is_blue": 0.0, "i_like_cats": -0.1,
            "be_concise": 0.1, "clown": -0.3}
    rows = [{"prompt_key": k, "metric": "ph_fixed", "value": v} for k, v in vals.items()]
    rows += [{"prompt_key": k, "metric": "ppd_fixed", "value": 1.0} for k in vals] + [
        {"prompt_key": "", "metric": "pca_point_fixed_evr1", "value": 0.9}]
    write_table(run / "heuristics.parquet", rows)
    cfg = cfg_of(project, f"sweep.select.heuristics_run={run}", "sweep.select.random=0")
    exp = tmp_path / "exp"
    trials, got = select(cfg, expand(cfg), exp)
    assert {r["prompt"]: r["selected_as"] for r in got if r["selected_as"] != "not"} == {
        "answer_french": "top", "speak_french": "top", "clown": "bottom", "the_sky_is_blue": "control"}
    assert {t.label for t in trials} == {"control", "answer_french/fixed", "speak_french/fixed", "clown/fixed",
                                         "the_sky_is_blue/fixed"}
    assert not (exp / "heuristics.parquet").exists()  # read, not computed
    capsys.readouterr()
    select(cfg, expand(cfg), exp)
    assert "nothing recomputed" in capsys.readouterr().out
    rows[0]["value"] = -1.0  # the run changed: its values are read again
    write_table(run / "heuristics.parquet", rows)
    _, again = select(cfg, expand(cfg), exp)
    assert "nothing recomputed" not in capsys.readouterr().out
    assert next(r for r in again if r["prompt"] == "answer_french")["selected_as"] == "bottom"
    # A metric the run does not have, or a global one, is refused naming the file.
    for bad in ("gamma_fixed", "pca_point_fixed_evr1"):
        with pytest.raises(ConfigError, match=f"sweep.select.heuristic='{bad}' is not a per-prompt metric of .*heur"):
            check(cfg_of(project, f"sweep.select.heuristics_run={run}", f"sweep.select.heuristic={bad}"))
    with pytest.raises(ConfigError, match="heuristics_run: .*missing.*not found"):
        check(cfg_of(project, f"sweep.select.heuristics_run={tmp_path / 'missing'}"))


def test_a_selection_on_s3_is_kept_in_the_bucket(s3, project, tmp_path, monkeypatch, capsys):  # noqa: F811
    _, fs = s3
    monkeypatch.setenv("RAYSWEEP_SCRATCH", str(tmp_path / "scratch"))
    run = tmp_path / "heur"
    write_table(run / "heuristics.parquet", [{"prompt_key": k, "metric": "ph_fixed", "value": float(i)}
                                             for i, k in enumerate(PROMPTS)])
    monkeypatch.chdir(project)
    args = ["exp=sel", "storage=s3://bkt/runs", f"sweep.select.heuristics_run={run}", "dry_run=true"]
    assert main(args) == 0
    assert "selection by ph_fixed" in capsys.readouterr().out
    with fs.open_input_file("bkt/runs/sel/selection.parquet") as f:
        assert pl.read_parquet(f).height == len(PROMPTS)
    import shutil

    shutil.rmtree(tmp_path / "scratch")  # another machine: the selection comes from the bucket
    assert main(args) == 0
    assert "nothing recomputed" in capsys.readouterr().out


# --- predicted vs observed (unit) ------------------------------------------------------


def test_prediction_pairs_each_trained_prompt_with_its_suppression(tmp_path):
    rng = np.random.default_rng(0)
    prompts = ["p1", "p2", "p3", "p4", "p5", "p6"]
    value = dict(zip(prompts, [3.0, 2.5, 2.0, 1.0, 0.5, 0.0]))
    selected = {"p1": "top", "p2": "top", "p3": "random", "p4": "not", "p5": "bottom", "p6": "control"}
    trained = [p for p in prompts if selected[p] != "not"]
    trials = [{"trial_id": "ctl", "label": "control", "defense": "none", "prompt": "", "mode": "", "placement": "",
               "control_id": "ctl", "neutral_id": ""}]
    trials += [{"trial_id": f"t_{p}", "label": f"{p}/fixed", "defense": "ip", "prompt": p, "mode": "fixed",
                "placement": "user_prefix", "control_id": "ctl", "neutral_id": "t_p6"} for p in trained]
    scores, truth = [], {}
    for q in range(8):
        base = 80 + rng.normal(0, 5)
        scores.append({"trial_id": "ctl", "step": 4, "condition": "default", "trait": "french", "question_id": q,
                       "sample": 0, "score": base})
        for p in trained:
            s = base - 10 * value[p] + rng.normal(0, 3)
            truth.setdefault(p, []).append(base - s)
            scores.append({"trial_id": f"t_{p}", "step": 4, "condition": "default", "trait": "french",
                           "question_id": q, "sample": 0, "score": s})
    sel = pl.DataFrame({"prompt": prompts, "heuristic": ["ph_fixed"] * 6, "value": [value[p] for p in prompts],
                        "rank": list(range(1, 7)), "selected_as": [selected[p] for p in prompts]})
    pred = prediction(sel, pl.DataFrame(trials), pl.DataFrame(scores))
    assert pred.filter(pl.col("trained")).height == 5 and pred.filter(~pl.col("trained"))["prompt"].to_list() == ["p4"]
    got = {r["prompt"]: r["mean"] for r in pred.filter(pl.col("trained")).iter_rows(named=True)}
    assert got == pytest.approx({p: float(np.mean(v)) for p, v in truth.items()})
    fit = prediction_fit(pred).row(0, named=True)
    x, y = [value[p] for p in trained], [got[p] for p in trained]
    r = stats.pearsonr(x, y)
    assert fit["n"] == 5 and fit["pearson_r"] == pytest.approx(r.statistic)
    z, h = math.atanh(r.statistic), stats.norm.ppf(0.975) / math.sqrt(5 - 3)  # Fisher z
    assert (fit["pearson_lo"], fit["pearson_hi"]) == pytest.approx((math.tanh(z - h), math.tanh(z + h)))
    assert fit["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert fit["top_mean"] == pytest.approx((got["p1"] + got["p2"]) / 2) and fit["bottom_mean"] == pytest.approx(got["p5"])
    assert fit["pearson_r"] > 0.9 and fit["top_minus_bottom"] > 0


# --- a selecting sweep on a real local Ray ---------------------------------------------


def finished(exp_dir: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in (exp_dir / "trials").glob("*/done.json")}


@heavy
@pytest.fixture(scope="module")
def selected_run(ray_local, project, tmp_path_factory):
    import os

    storage = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["exp=sel", f"storage={storage}"])
    finally:
        os.chdir(cwd)
    return storage / "sel", code, out.getvalue()


def test_a_selecting_sweep_trains_only_the_selected_prompts(selected_run, project):
    exp, code, out = selected_run
    assert code == 0, out
    sel = pl.read_parquet(exp / "selection.parquet")
    h = pl.read_parquet(exp / "heuristics.parquet").filter(pl.col("metric") == "ph_fixed")
    ph = dict(zip(h["prompt_key"], h["value"]))
    assert set(sel["prompt"]) == set(ph) == set(PROMPTS)  # the stage scored exactly the candidates
    assert dict(zip(sel["prompt"], sel["value"])) == ph
    ranked = sorted(ph, key=lambda p: (-ph[p], p))
    assert sel.sort("rank")["prompt"].to_list() == ranked
    kinds = dict(zip(sel["prompt"], sel["selected_as"]))
    assert kinds["the_sky_is_blue"] == "control"
    non_ctl = [p for p in ranked if p != "the_sky_is_blue"]
    assert [p for p in non_ctl if kinds[p] == "top"] == non_ctl[:2]
    assert [p for p in non_ctl if kinds[p] == "bottom"] == non_ctl[-1:]
    assert sum(k == "random" for k in kinds.values()) == 1
    chosen = {p for p, k in kinds.items() if k != "not"}
    trials = pl.read_parquet(exp / "trials.parquet")
    assert set(trials.filter(pl.col("defense") == "ip")["prompt"]) == chosen and trials.height == 6
    # The trained trials are those of a plain grid of the chosen prompts.
    plain = expand(cfg_of(project, "sweep.select.heuristic=",
                          "sweep.arms=[{defense: {kind: none}}, {defense: {kind: ip, ip: {prompt: "
                          f"[{', '.join(sorted(chosen))}], mode: fixed}}}}}}]"))
    assert set(trials["trial_id"]) == {t.id for t in plain} == set(finished(exp))
    # Predicted vs observed: every trained prompt has a suppression; the others are predicted only.
    pred = pl.read_parquet(exp / "prediction.parquet")
    assert set(pred.filter(pl.col("trained"))["prompt"]) == chosen
    assert set(pred.filter(~pl.col("trained"))["prompt"]) == set(PROMPTS) - chosen
    fit = pl.read_parquet(exp / "prediction_fit.parquet").row(0, named=True)
    assert fit["n"] == 5 and fit["heuristic"] == "ph_fixed" and fit["n_top"] == 2 and fit["n_bottom"] == 1
    # The tiny random model learns no French, so suppression has no spread here: the fit says so.
    assert "predicted vs observed: ph_fixed" in out and "french (fixed): n = 5" in out and "top 2:" in out


def test_a_rerun_trains_nothing_and_does_not_recompute_the_heuristic(selected_run, project, capsys, monkeypatch):
    exp, code, _ = selected_run
    assert code == 0
    before = finished(exp)
    stamps = {p: (exp / p).stat().st_mtime_ns for p in ("heuristics.parquet", "cache/logprobs.parquet")}
    monkeypatch.chdir(project)
    assert main(["exp=sel", f"storage={exp.parent}"]) == 0
    out = capsys.readouterr().out
    assert "nothing recomputed" in out and "heuristics:" not in out
    assert "6 trials, 6 finished, 0 to run" in out
    assert finished(exp) == before
    assert {p: (exp / p).stat().st_mtime_ns for p in stamps} == stamps


def test_the_report_draws_predicted_vs_observed(selected_run, project):
    from test_report import check_page, report

    exp, code, _ = selected_run
    assert code == 0
    proc = report(project, "exp=sel", f"storage={exp.parent}")
    assert proc.returncode == 0, proc.stderr
    page = (exp / "report" / "index.html").read_text()
    assert "Predicted vs observed" in page and "pearson_lo" in page
    png = exp / "report" / "prediction.png"
    assert png.is_file() and png.stat().st_size > 5000
    spec = (exp / "report" / "prediction.html").read_text()
    assert "predicted only" in spec and "n = 5" in spec and "selected as" in spec
    check_page(exp / "report" / "prediction.html", n_charts=1)
    check_page(exp / "report" / "index.html", n_charts=5)


def test_elicitation_ranks_in_a_dry_run_and_feeds_the_trials_memo(ray_local, project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["exp=sel", f"storage={tmp_path}", "sweep.select.heuristic=elicitation", "dry_run=true"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "elicitation of 7 candidate prompts" in out and "selection by elicitation" in out
    assert "trials" in out and not (tmp_path / "sel" / "trials").exists()  # ranked, nothing trained
    sel = pl.read_parquet(tmp_path / "sel" / "selection.parquet")
    assert sel.height == 7 and sel["value"].is_finite().all() and set(sel["heuristic"]) == {"elicitation"}
    memo = list((tmp_path / "sel" / "cache").glob("*.json"))
    assert len(memo) == 8  # the default condition once + each prompt's training condition: the trials' step-0 memo
    assert main(args) == 0
    assert "nothing recomputed" in capsys.readouterr().out
