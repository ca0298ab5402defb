"""Tests for raysweep.heuristics.logprobs and the stage: rows, shared default, cache, Ray Data == plain.
The scoring kernel itself (batches, packing, exact log-probs) is tested in tests/test_scoring.py."""

from pathlib import Path

import numpy as np
import pytest
import torch

from raysweep.data import read_chat
from raysweep.eval.scoring import score_sequences
from raysweep.heuristics import logprobs as lp

REPO = Path(__file__).resolve().parents[1]
CONVS = read_chat(REPO / "datasets" / "french_demo" / "train.jsonl")[:5]
PROMPTS = {"answer_french": "Answer in French.", "the_sky_is_blue": "The sky is blue.", "cats": "I like cats."}
POOLS = {"answer_french": ["Reply in French.", "Please write your answer in French.", "French only."],
         "the_sky_is_blue": ["Blue is the sky."], "cats": ["Cats are nice.", "I love cats."]}


def reference(model, input_ids, labels):
    """Straightforward: one sequence, full logits, log_softmax, pick the labelled tokens."""
    out = []
    with torch.no_grad():
        for ids, lab in zip(input_ids, labels):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            out.append(np.array([logp[t - 1, y].item() for t, y in enumerate(lab) if y != -100]))
    return out


def counting(model, **kw):
    """A scorer that records how many sequences reach the model."""
    seen = []

    def scorer(ids, labels):
        seen.extend(ids)
        return score_sequences(model, ids, labels, **kw)

    return scorer, seen


def test_rows_default_shared_and_mix_index_matched():
    rows = lp.build_rows(PROMPTS, {"train": CONVS, "control": CONVS[:2]}, pools=POOLS)
    default = [r for r in rows if r["variant"] == "default"]
    assert len(default) == 7 and {r["prompt_key"] for r in default} == {""}
    assert len(rows) == 7 + 3 * 2 * 7
    mix = [r for r in rows if r["variant"] == "mix" and r["prompt_key"] == "answer_french" and r["set"] == "train"]
    for r in mix:  # example k gets pool[k % len(pool)], before the instruction
        k = r["example_id"]
        assert r["messages"][0]["content"] == f"{POOLS['answer_french'][k % 3]} {CONVS[k][0]['content']}"
    fixed = lp.build_rows({"cats": "I like cats."}, {"train": CONVS[:1]}, variants=["fixed"], placement="system")
    assert fixed[1]["messages"][0] == {"role": "system", "content": "I like cats."}
    with pytest.raises(ValueError, match="pool"):
        lp.build_rows({"x": "y"}, {"train": CONVS[:1]}, pools={})


def test_encode_scores_only_the_last_answer(tiny):
    _model, tok = tiny
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Au revoir"}]
    ids, labels = lp.encode_completion(tok, conv)
    scored = tok.decode([y for y in labels if y != -100])
    assert scored.startswith("Au revoir") and "Hello" not in scored and scored.endswith("<|im_end|>")
    assert lp.encode_completion(tok, conv, max_len=10)[0] == ids[:10]


def test_default_variant_is_computed_once_and_cached(tiny, tmp_path):
    model, tok = tiny
    sets = {"train": CONVS[:4], "control": CONVS[4:]}
    rows = lp.build_rows(PROMPTS, sets, pools=POOLS)
    keys, items = lp.encode_rows(tok, rows, "tiny")
    scorer, seen = counting(model)
    cache = {}
    out = lp.run_pass(keys, items, lambda it: lp.score_plain(it, scorer), cache)
    # 5 default sequences once, not once per prompt; then 3 prompts x (fixed, mix) x 5 examples
    assert len(seen) == len(items) == 5 + 3 * 2 * 5
    default_ids = {tuple(lp.encode_completion(tok, c)[0]) for c in CONVS}
    assert sum(tuple(s) in default_ids for s in seen) == 5
    logprobs, tokens = lp.logprob_tables(rows, out)
    assert logprobs.num_rows == tokens.num_rows == len(rows)
    by = {(k, v, s, e): (x, n) for k, v, s, e, x, n in zip(*(logprobs.column(c).to_pylist() for c in
          ("prompt_key", "variant", "set", "example_id", "logprob", "n_tokens")))}
    assert by[("", "default", "control", 0)][1] == len(lp.encode_completion(tok, CONVS[4])[0]) - \
        lp.encode_completion(tok, CONVS[4])[1].count(-100)
    # A second pass (new process: the cache on disk) scores nothing.
    lp.save_cache(tmp_path / "cache.parquet", cache)
    seen.clear()
    again = lp.run_pass(keys, items, lambda it: lp.score_plain(it, scorer), lp.load_cache(tmp_path / "cache.parquet"))
    assert seen == [] and all(np.array_equal(a, b) for a, b in zip(out, again))


def test_selfperplexity_sequences(tiny):
    model, tok = tiny
    seqs = lp.selfperp_sequences(tok, "Answer in French.")
    raw_ids, raw_labels = seqs["raw"]
    assert raw_ids == tok("Answer in French.")["input_ids"] and raw_labels[0] == -100
    ids, labels = seqs["context"]
    assert tok.decode([y for y in labels if y != -100]) == "Answer in French."
    assert tok.decode(ids).startswith("<|im_start|>system")  # conditioned on the template's system block
    sys_ids, _sys_labels = lp.selfperp_sequences(tok, "Answer in French.", "system")["context"]
    assert tok.decode(sys_ids).startswith("<|im_start|>system\nAnswer in French.")
    fast = score_sequences(model, [ids, raw_ids], [labels, raw_labels])
    ref = reference(model, [ids, raw_ids], [labels, raw_labels])
    t = lp.selfperp_table(["a", "a"], ["context", "raw"], fast)
    assert np.allclose(t.column("nll_per_token").to_pylist(), [-ref[0].mean(), -ref[1].mean()], atol=1e-6)


def test_ray_data_pass_equals_plain(ray_local, tiny):
    model, tok = tiny
    rows = lp.build_rows(PROMPTS, {"train": CONVS[:3]}, pools=POOLS)
    _keys, items = lp.encode_rows(tok, rows, "tiny")
    plain = lp.score_plain(items, lambda i, l: score_sequences(model, i, l))
    ray_out = lp.score_ray(items, backend="transformers", backend_kwargs={"model_name": "tiny-random"},
                           concurrency=2, batch_rows=4, num_cpus=1)
    assert set(ray_out) == set(items)
    for k in items:
        assert np.abs(ray_out[k] - plain[k]).max(initial=0.0) < 1e-6


# ---------------------------------------------------------------------------------------------
# The stage and its CLI


@pytest.mark.parametrize("exp", ["heuristics_playful_french", "heuristics_german_flattering"])
def test_experiment_files_resolve(exp, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # experiment files name data relative to the repository
    from raysweep.config import load_config
    from raysweep.heuristics.__main__ import main

    cfg = load_config(exp)
    h = cfg.heuristics
    assert cfg.sweep.arms == [] and not h.prompts_file  # the family's own prompts and groups
    assert main([f"exp={exp}", "dry_run=true"]) == 0
    assert capsys.readouterr().out.startswith("48 prompts (48 labelled)")


@pytest.mark.integration
@pytest.mark.parametrize("exp", ["heuristics_playful_french", "heuristics_german_flattering"])
def test_experiment_files_run_every_metric_for_48_prompts(exp, tmp_path, monkeypatch):
    """Issue 4 acceptance: each file runs every metric family for all 48 prompts of the seed's
    groups with the rephrasing pools of the data root (tiny model, a few completions)."""
    monkeypatch.chdir(REPO)
    import polars as pl

    from raysweep.config import load_config
    from raysweep.heuristics.__main__ import main

    h_cfg = load_config(exp).heuristics
    keys = {k for group in load_config(exp).prompt_groups.values() for k in group}
    assert len(keys) == 48
    assert main([f"exp={exp}", "model.name=tiny-random", f"storage={tmp_path}", "heuristics.n_train=3",
                 "heuristics.n_control=2", "heuristics.n_extra=2"]) == 0
    out = tmp_path / exp
    assert set(pl.read_parquet(out / "prompts.parquet")["prompt_key"]) == keys
    h = pl.read_parquet(out / "heuristics.parquet")
    per_prompt = h.filter(pl.col("prompt_key") != "")
    assert set(per_prompt["prompt_key"]) == keys
    metric_sets = per_prompt.group_by("prompt_key").agg(pl.col("metric").sort())["metric"].to_list()
    assert all(m == metric_sets[0] for m in metric_sets)  # every prompt gets every metric
    names = set(metric_sets[0])
    expected = {"ph_fixed", "ph_mix", "ppd_fixed", "ppd_mix", "gamma_fixed", "sigma_mix", "snr_abs_fixed",
                "mald_mix", "selfperp_raw", "selfperp_context", "pca_point_fixed_pc1", "svd_token_mix_sv1",
                "angle_raw_point_fixed_to_neutral", "angle_svd2_token_mix_to_neutral", "gap_svd1_mald_ratio",
                "gap_pca1_cos_fixed_mix", "gap_raw_snr_ratio"}
    assert expected <= names, expected - names
    assert {m.split("_")[0] for m in names} == {"ph", "ppd", "gamma", "sigma", "snr", "mald", "selfperp", "pca",
                                                "svd", "angle", "gap"}
    overall = set(h.filter(pl.col("prompt_key") == "")["metric"])  # explained variance, angle summaries
    assert {"pca_point_fixed_evr1", "svd_token_mix_evr1", "angle_raw_point_fixed_cross_trait_mean"} <= overall
    if h_cfg.extra_sets:  # cross-trait PH / PPD on the other trait's completions
        assert any("@" in m for m in names)
    scalar = per_prompt.filter(pl.col("metric").str.contains(r"^(ph|ppd|gamma|sigma|mald|selfperp)_"))
    assert scalar.height >= 48 * 10 and not scalar["value"].is_nan().any()
    assert pl.read_parquet(out / "angles.parquet").height > 0


@pytest.mark.integration
def test_stage_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    import pyarrow.parquet as pq

    from raysweep.heuristics import metrics as M
    from raysweep.heuristics.__main__ import main

    sup = tmp_path / "suppression.csv"
    keys = ["corrected_inoculation", "whimsical", "witty", "strong_elicitation", "the_sky_is_blue", "i_like_cats"]
    sup.write_text("prompt_key,prefix_type,suppression\n" + "".join(
        f"{k},{t},{i * 7 % 5 + (t == 'fixed')}\n" for i, k in enumerate(keys) for t in ("fixed", "mix")))
    args = ["exp=heuristics_playful_french", "model.name=tiny-random", f"storage={tmp_path}",
            "heuristics.groups=[v4,v5]", "heuristics.n_train=3", "heuristics.n_control=2", "heuristics.n_extra=2",
            f"heuristics.suppression={sup}"]
    assert main(args) == 0
    out = tmp_path / "heuristics_playful_french"
    logprobs = pq.read_table(out / "logprobs.parquet")
    assert logprobs.num_rows == 7 + 12 * 2 * 7  # default once per example + 12 prompts x 2 variants
    h = {(k, m): v for k, m, v in zip(*(pq.read_table(out / "heuristics.parquet").column(c).to_pylist()
                                          for c in ("prompt_key", "metric", "value")))}
    w = M.w_vector(M.diff_vectors(logprobs, "fixed", "train"), "witty")
    assert w.size == 3 and np.isclose(h[("witty", "ph_fixed")], w.mean())
    assert ("", "angle_raw_point_fixed_playful_x_neutral_mean") in h and ("witty", "gap_svd1_mald_ratio") in h
    assert ("witty", "selfperp_context") in h and ("witty", "ph_mix@french_heldout") in h
    perf = pq.read_table(out / "heuristic_performance.parquet")
    assert "ph_prefix" in perf.column("metric").to_pylist()
    for name in ("token_logprobs", "selfperp", "angles"):
        assert (out / f"{name}.parquet").is_file()
    # Re-running scores nothing new: every sequence comes from the cache.
    mtime = (out / "cache" / "logprobs.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "cache" / "logprobs.parquet").stat().st_mtime_ns == mtime
    assert main(["exp=heuristics_playful_french", "heuristics.groups=[nope]"]) == 2

    # The report of a heuristics-only run draws the prompt embeddings (coloured by the given
    # suppression) and the angle heatmaps from these tables.
    import polars as pl

    from raysweep.report.page import build_report, chart_embeddings, load_run

    prompts = pl.read_parquet(out / "prompts.parquet")
    assert prompts.height == 12 and set(prompts["label"]) == {"playful", "neutral"}
    run = load_run(out)
    layers = chart_embeddings(run).to_dict()["spec"]["layer"]
    assert len(layers) == 2  # grey points under the ones coloured by suppression
    index, failures = build_report(out)
    assert not failures
    for name in ("embeddings", "angles"):
        assert (out / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{name}.html" in index.read_text()
