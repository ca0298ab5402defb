"""Tests for raysweep.heuristics (metrics, geometry, families, performance) and seed_import: every
metric on hand-computable inputs."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pathlib import Path

from raysweep.heuristics import families as F
from raysweep.heuristics import geometry as G
from raysweep.heuristics import metrics as M
from raysweep.heuristics import performance as P
from raysweep.heuristics.logprobs import schema
from raysweep.heuristics.seed_import import (
    import_perplexity_json,
    import_tokens_json,
    seed_prompts,
)

NAN = float("nan")


REPO = Path(__file__).resolve().parents[1]


def close(a, b, tol=1e-9):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# ---------------------------------------------------------------------------------------------
# One w vector


def test_scalar_metrics_by_hand():
    w = [1.0, -1.0, 2.0, 0.0]
    sd = math.sqrt(5 / 3)  # deviations 0.5, -1.5, 1.5, -0.5: sum of squares 5, ddof=1
    assert M.ph(w) == 0.5
    assert M.ppd(w) == M.mald(w) == 1.0
    assert M.gamma(w) == 0.5  # 0 is not > 0
    assert close(M.sigma(w), sd)
    assert close(M.snr(w), 0.5 / sd)
    assert close(M.snr_abs(w), 0.5 / sd)  # |mean| / std (Exp 20, heuristic 9), not mean|w| / std
    assert close(M.snr_abs([-1.0, 1.0, -2.0, 0.0]), 0.5 / sd)  # unsigned: the sign of the mean goes
    assert close(M.eff_rank(w), 2 * math.sqrt(2))  # p = 1/4, 1/4, 1/2
    assert close(M.eff_rank([3.0, 3.0, 3.0]), 3.0)  # uniform: every example counts
    assert close(M.eff_rank([0.0, 5.0, 0.0]), 1.0)  # one example carries it all
    assert close(M.cosine([1, 0], [1, 1]), 1 / math.sqrt(2))


def test_undefined_metrics_are_nan():
    for fn in (M.ph, M.ppd, M.gamma, M.sigma, M.snr, M.snr_abs, M.eff_rank):
        assert math.isnan(fn([]))
    assert math.isnan(M.sigma([0.4]))  # one value has no ddof=1 std
    assert M.sigma([0.3, 0.3]) == 0.0 and math.isnan(M.snr([0.3, 0.3])) and math.isnan(M.snr_abs([0.3, 0.3]))
    assert math.isnan(M.eff_rank([0.0, 0.0]))
    assert math.isnan(M.cosine([0, 0], [1, 1]))
    # non-finite entries are left out, not propagated
    assert M.ph([1.0, NAN, 3.0]) == 2.0 and M.gamma([NAN, -1.0]) == 0.0


def test_gap_heuristics_by_hand():
    f, m = [1.0, 2.0, 3.0], [1.0, -1.0, 2.0]
    s_f, s_m = 1.0, math.sqrt(7 / 3)  # m deviations 1/3, -5/3, 4/3
    g = M.gap_heuristics(f, m)
    assert set(g) == set(M.GAP_HEURISTICS)
    expected = {
        "ph_ratio": (2 / 3) / 2,
        "sigma2_diff": 7 / 3 - 1,
        "gamma_mix": 2 / 3,
        "snr_mix": (2 / 3) / s_m,
        "cos_fixed_mix": 5 / math.sqrt(14 * 6),
        "eff_rank_mix": 2 * math.sqrt(2),
        "snr_ratio": ((2 / 3) / s_m) / (2 / s_f),
        "mald_ratio": (4 / 3) / 2,
        "snr_abs_mix": (2 / 3) / s_m,  # |mean(m)| / std(m)
        "snr_abs_ratio": ((2 / 3) / s_m) / (2 / s_f),
    }
    for k, v in expected.items():
        assert close(g[k], v), k
    # PH_fixed = 0: the ratio is undefined, not infinite; constant w_fixed: SNR ratios undefined
    z = M.gap_heuristics([1.0, -1.0], [0.5, 0.7])
    assert math.isnan(z["ph_ratio"]) and math.isnan(z["snr_ratio"]) and close(z["mald_ratio"], 0.6)
    c = M.gap_heuristics([2.0, 2.0], [1.0, 3.0])
    assert math.isnan(c["snr_ratio"]) and math.isnan(c["snr_abs_ratio"]) and close(c["sigma2_diff"], 2.0)


# ---------------------------------------------------------------------------------------------
# Decompositions


def test_pca_variance_coordinates_and_signs():
    w = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    coords, comps, evr = G.decompose(w, "pca", 3)
    assert np.allclose(evr[:2], [0.8, 0.2]) and math.isnan(evr[2])  # variances 8/3 and 2/3; 2 features
    assert np.allclose(comps[0], [0, 1]) and np.allclose(comps[1], [1, 0])
    assert np.allclose(coords[:, 0], [0, 0, 2, -2]) and np.allclose(coords[:, 1], [1, -1, 0, 0])
    assert np.isnan(coords[:, 2]).all()
    # scikit-learn's sign convention (a tie in magnitude: the first entry is positive), so
    # negating W negates the coordinates only.
    line = np.array([[2.0, 2.0], [-2.0, -2.0], [1.0, 1.0], [-1.0, -1.0]])
    for sign in (1, -1):
        c, v, e = G.decompose(sign * line, "pca", 1)
        assert np.allclose(v[0], [1 / math.sqrt(2)] * 2) and np.isclose(e[0], 1.0)
        assert np.allclose(c[:, 0], sign * math.sqrt(2) * np.array([2, -2, 1, -1]))


def test_truncated_svd_is_uncentred():
    w = np.array([[3.0, 0.0], [0.0, 1.0]])
    coords, comps, evr = G.decompose(w, "svd", 2)
    assert np.allclose(comps, [[1, 0], [0, 1]]) and np.allclose(coords, [[3, 0], [0, 1]])
    # sigma^2 = 9, 1 of 10 (here scikit-learn's coordinate-variance ratio, 2.25/2.5 and 0.25/2.5, agrees)
    assert np.allclose(evr, [0.9, 0.1])
    # Identical rows: PCA has nothing to explain (NaN); SVD has a coordinate and all of ||W||^2 in
    # it (scikit-learn's ratio divides by a zero column variance: NaN).
    same = np.ones((3, 2))
    c, _v, e = G.decompose(same, "pca", 2)
    assert np.isnan(c).all() and np.isnan(e).all()
    c, v, e, sk = G.decompose_all(same, "svd", 1)
    assert np.allclose(c[:, 0], math.sqrt(2)) and np.allclose(v[0], [1 / math.sqrt(2)] * 2)
    assert np.allclose(e, [1.0]) and np.isnan(sk).all()
    assert np.isnan(G.decompose(np.zeros((3, 4)), "svd", 2)[0]).all()


def _sign_matrix():
    """A W whose PCA / SVD first component has a negative entry sum but a positive largest entry."""
    d1 = np.array([0.8, -0.36, -0.48])  # unit; sum -0.04 < 0; largest |entry| 0.8 > 0
    d2 = np.array([0.0, 0.8, -0.6])  # unit, orthogonal to d1
    t1, t2 = np.array([3.0, -2.0, 1.0, -2.5, 0.5]), np.array([0.4, 0.3, -0.6, 0.1, -0.2])
    return np.outer(t1, d1) + np.outer(t2, d2) + 0.5 * d1  # rows off-centre, so SVD != PCA


def test_signs_are_scikit_learns():
    """The seed keeps scikit-learn's signs: no re-orientation by the entry sum (issue 13 item 7)."""
    from sklearn.decomposition import PCA, TruncatedSVD
    from sklearn.utils.extmath import svd_flip

    w = _sign_matrix()
    ref = PCA(n_components=2, svd_solver="full").fit(w)
    coords, comps, evr = G.decompose(w, "pca", 2)
    assert np.allclose(comps, ref.components_) and np.allclose(coords, ref.transform(w))
    assert np.allclose(evr, ref.explained_variance_ratio_)
    ref = TruncatedSVD(n_components=2, algorithm="randomized", n_iter=10, random_state=0).fit(w)
    coords, comps, _evr = G.decompose(w, "svd", 2)
    assert np.allclose(comps, ref.components_) and np.allclose(coords, ref.transform(w))
    # The installed scikit-learn flips on V (u_based_decision=False): each component's
    # largest-magnitude entry is positive, whatever its sum. Here that sum is negative.
    for method in ("pca", "svd"):
        v1 = G.decompose(w, method, 1)[1][0]
        assert v1[np.argmax(np.abs(v1))] > 0 and v1.sum() < 0 and np.allclose(np.abs(v1), [0.8, 0.36, 0.48], atol=0.05)
    u, vt = svd_flip(np.eye(2), np.array([[0.8, -0.36, -0.48], [-0.1, 0.0, -0.9]]), u_based_decision=False)
    assert np.allclose(vt, [[0.8, -0.36, -0.48], [0.1, 0.0, 0.9]])


def test_svd_explained_variance_is_the_seeds():
    """TruncSVD "explained variance" as published (Exp 19/20): sigma_k^2 / sum sigma^2 of uncentred W."""
    from sklearn.decomposition import TruncatedSVD

    w = _sign_matrix()
    s = np.linalg.svd(w, compute_uv=False)
    _c, _v, evr, sk = G.decompose_all(w, "svd", 2)
    assert np.allclose(evr, s[:2] ** 2 / (s**2).sum())
    ref = TruncatedSVD(n_components=2, algorithm="randomized", n_iter=10, random_state=0).fit(w)
    assert np.allclose(sk, ref.explained_variance_ratio_) and not np.allclose(evr, sk, atol=1e-3)
    # The decomposition family reports both, under different names.
    keys = [f"p{i}" for i in range(w.shape[0])]
    rows = [("", "default", "train", e, 0.0) for e in range(3)]
    rows += [(k, "fixed", "train", e, float(w[i, e])) for i, k in enumerate(keys) for e in range(3)]
    h = as_dict(F.heuristics_table(F.Inputs(logprobs=logprob_table(rows), variants=("fixed",), n_components=2),
                                   ["decomposition"]))
    assert close(h[("", "svd_point_fixed_evr1")], evr[0]) and close(h[("", "svd_point_fixed_sklearn_evr1")], sk[0])
    assert close(h[("p0", "pca_point_fixed_pc1")], G.decompose(w, "pca", 1)[0][0, 0])


def test_rank1_reconstructions():
    wf = np.array([[3.0, 4.0], [6.0, 8.0]])
    wm = np.array([[4.0, 3.0], [0.0, 5.0]])
    v1 = np.array([0.6, 0.8])
    f, m = G.rank1(wf, wm, "svd")  # scores on v1: fixed 5, 10; mix 4.8, 4.0
    assert np.allclose(f, np.outer([5, 10], v1)) and np.allclose(m, np.outer([4.8, 4.0], v1))
    f, m = G.rank1(wf, wm, "pca")  # centred on W_fixed's mean (4.5, 6): fixed -2.5, 2.5; mix -2.7, -3.5
    assert np.allclose(f, np.outer([-2.5, 2.5], v1)) and np.allclose(m, np.outer([-2.7, -3.5], v1))
    # On a rank-1 reconstruction the cosine is the sign of score_f * score_m (the seed's "binary").
    assert close(M.gap_heuristics(f[0], m[0])["cos_fixed_mix"], 1.0)
    assert close(M.gap_heuristics(f[1], m[1])["cos_fixed_mix"], -1.0)


# ---------------------------------------------------------------------------------------------
# Angles


X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
KEYS = ["p0", "p1", "p2", "p3"]
GROUPS = {"p0": "a", "p1": "b", "p2": "a", "p3": "n"}


def test_angle_matrix_and_summaries():
    a = G.angle_matrix(X)
    expected = np.array([[0, 90, 45, 180], [90, 0, 45, 90], [45, 45, 0, 135], [180, 90, 135, 0]])
    assert np.allclose(a, expected)
    s = G.angle_summaries(a, KEYS, GROUPS, "n")
    assert set(s) == {"within_a", "cross_trait", "a_x_n", "b_x_n"}
    assert close(s["within_a"]["mean"], 45) and math.isnan(s["within_a"]["std"]) and s["within_a"]["n"] == 1
    assert close(s["cross_trait"]["mean"], 67.5) and close(s["cross_trait"]["std"], 22.5 * math.sqrt(2))
    assert close(s["a_x_n"]["mean"], 157.5) and close(s["a_x_n"]["std"], 22.5 * math.sqrt(2))
    assert close(s["b_x_n"]["mean"], 90)
    to = G.angle_to_groups(a, KEYS, GROUPS)
    assert all(close(to["p0"][g], v) for g, v in {"a": 45.0, "b": 90.0, "n": 180.0}.items())
    assert close(to["p3"]["a"], 157.5) and math.isnan(to["p1"]["b"])  # p1 is b's only prompt
    cen = G.angle_to_centroids(X, KEYS, GROUPS)
    assert close(cen["p1"]["a"], math.degrees(math.acos(0.5 / math.sqrt(1.25))))  # (0, 1) vs centroid (1, 0.5)
    assert close(cen["p0"]["a"], 45.0)  # p0's own row is left out of its group's centroid
    zero = G.angle_matrix(np.array([[0.0, 0.0], [1.0, 0.0]]))
    assert np.isnan(zero[0]).all() and zero[1, 1] == 0


# ---------------------------------------------------------------------------------------------
# Tables


def logprob_table(rows):
    """rows: (prompt_key, variant, set, example_id, mean_logprob)."""
    cols = list(zip(*rows))
    n = len(rows)
    return pa.table({"prompt_key": cols[0], "variant": cols[1], "set": cols[2], "example_id": cols[3],
                     "logprob": [None] * n, "n_tokens": [None] * n, "mean_logprob": cols[4]}, schema=schema("logprobs"))


def toy_logprobs():
    default_train, default_ctrl = [-2.0, -3.0, -1.0], [-1.0, -2.0]
    rows = [("", "default", "train", k, v) for k, v in enumerate(default_train)]
    rows += [("", "default", "control", k, v) for k, v in enumerate(default_ctrl)]
    w = {"a": ([1.0, -1.0, 2.0], [0.5, -0.5], [0.5, 0.5, 0.5]), "b": ([0.0, 1.0, 2.0], [-1.0, 1.0], [1.0, 0.0, -1.0])}
    for key, (wf, wc, wm) in w.items():
        rows += [(key, "fixed", "train", k, d + x) for k, (d, x) in enumerate(zip(default_train, wf))]
        rows += [(key, "fixed", "control", k, d + x) for k, (d, x) in enumerate(zip(default_ctrl, wc))]
        rows += [(key, "mix", "train", k, d + x) for k, (d, x) in enumerate(zip(default_train, wm))]
    return logprob_table(rows), w


def as_dict(table):
    return {(k, m): v for k, m, v in zip(*(table.column(c).to_pylist() for c in ("prompt_key", "metric", "value")))}


def test_scalar_family_on_a_table():
    table, w = toy_logprobs()
    d = M.diff_vectors(table, "fixed", "train")
    assert np.allclose(M.w_vector(d, "a"), w["a"][0])
    keys, mat = M.w_matrix(d, ["a", "b", "missing"])
    assert keys == ["a", "b"] and np.allclose(mat, [w["a"][0], w["b"][0]])
    h = as_dict(F.heuristics_table(F.Inputs(logprobs=table, variants=("fixed", "mix")), ["scalar"]))
    assert close(h[("a", "ph_fixed")], 2 / 3) and close(h[("b", "ph_fixed")], 1.0)
    assert close(h[("a", "ppd_fixed")], 0.5) and close(h[("b", "ppd_fixed")], 1.0)
    assert close(h[("a", "gamma_fixed")], 2 / 3) and close(h[("b", "gamma_fixed")], 2 / 3)
    assert close(h[("a", "sigma_mix")], 0.0) and math.isnan(h[("a", "snr_mix")])  # constant w: undefined SNR
    assert close(h[("b", "mald_mix")], 2 / 3) and close(h[("b", "ph_mix")], 0.0)


def test_missing_values_are_nan_not_zero():
    table, _w = toy_logprobs()
    rows = [r for r in zip(*(table.column(c).to_pylist() for c in ("prompt_key", "variant", "set", "example_id",
                                                                    "mean_logprob")))]
    rows = [(k, v, s, e, NAN if (k, v, s, e) == ("a", "fixed", "train", 0) else x) for k, v, s, e, x in rows]
    h = as_dict(F.heuristics_table(F.Inputs(logprobs=logprob_table(rows)), ["scalar"]))
    assert close(h[("a", "ph_fixed")], 0.5)  # (-1 + 2) / 2: the NaN example is left out
    # A prompt with no control rows has an undefined PPD.
    no_ctrl = logprob_table([r for r in rows if not (r[0] == "b" and r[2] == "control")])
    assert math.isnan(as_dict(F.heuristics_table(F.Inputs(logprobs=no_ctrl), ["scalar"]))[("b", "ppd_fixed")])


def test_cross_trait_on_another_completion_set():
    table, _w = toy_logprobs()
    extra = [("", "default", "french", 0, -4.0), ("", "default", "french", 1, -2.0),
             ("a", "fixed", "french", 0, -3.0), ("a", "fixed", "french", 1, -3.0)]
    rows = list(zip(*(table.column(c).to_pylist() for c in ("prompt_key", "variant", "set", "example_id",
                                                             "mean_logprob")))) + extra
    h = as_dict(F.heuristics_table(F.Inputs(logprobs=logprob_table(rows), variants=("fixed",)), ["cross"]))
    assert close(h[("a", "ph_fixed@french")], 0.0) and close(h[("a", "ppd_fixed@french")], 1.0)
    assert math.isnan(h[("b", "ph_fixed@french")])  # b has no rows on that set


def test_decomposition_gap_and_angle_families():
    table, w = toy_logprobs()
    inp = F.Inputs(logprobs=table, groups={"a": "t1", "b": "t2"}, neutral="n", n_components=2,
                   gap_fit={"both": ["a", "b"]})  # one rank-1 fitting set of both prompts
    h = as_dict(F.heuristics_table(inp, ["decomposition", "gap", "angles"]))
    wf = np.array([w["a"][0], w["b"][0]])
    coords, _c, _evr = G.decompose(wf, "pca", 2)
    assert close(h[("a", "pca_point_fixed_pc1")], coords[0, 0]) and close(h[("", "pca_point_fixed_evr1")], 1.0)
    assert math.isnan(h[("", "pca_point_fixed_evr2")])  # two prompts: one centred component
    assert math.isnan(h[("a", "pca_point_fixed_pc2")])
    assert ("a", "pca_token_fixed_pc1") not in h  # no token table given
    g = M.gap_heuristics(w["a"][0], w["a"][2])
    assert all(close(h[("a", f"gap_raw_{k}")], v) for k, v in g.items())
    f1, m1 = G.rank1(wf, np.array([w["a"][2], w["b"][2]]), "svd")
    assert close(h[("b", "gap_svd1_ph_ratio")], M.gap_heuristics(f1[1], m1[1])["ph_ratio"])
    assert close(h[("b", "gap_svd1_ph_ratio@fit_both")], h[("b", "gap_svd1_ph_ratio")])
    a, b = np.array(w["a"][0]), np.array(w["b"][0])
    angle = math.degrees(math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert close(h[("", "angle_raw_point_fixed_cross_trait_mean")], angle, 1e-9)
    assert close(h[("a", "angle_raw_point_fixed_to_t2")], angle, 1e-9)
    angles = F.angle_table(inp)
    assert angles.num_rows == 3 * 1 * 2 * 4  # (raw, pca2, svd2) x point x (fixed, mix) x 2 x 2 pairs
    with pytest.raises(ValueError, match="unknown metric families"):
        F.heuristics_table(inp, ["nope"])


def test_token_wise_matrix():
    s = schema("token_logprobs")
    rows = [("", "default", "train", 0, [-1.0, -2.0, -3.0]), ("", "default", "train", 1, [-1.0]),
            ("a", "fixed", "train", 0, [-0.5, -2.0, -4.0]), ("a", "fixed", "train", 1, [-2.0]),
            ("b", "fixed", "train", 0, [-1.0, -1.0]), ("b", "fixed", "train", 1, [0.0]),  # b is one token short
            ("c", "fixed", "train", 0, [-1.0, -1.0, -1.0])]  # c lacks example 1: example 1 is dropped for all
    cols = list(zip(*rows))
    t = pa.table(dict(zip(s.names, cols)), schema=s)
    keys, w = M.token_w_matrix(t, "fixed", "train", ["a", "b"])
    assert keys == ["a", "b"] and np.allclose(w, [[0.5, 0.0, -1.0], [0.0, 1.0, 1.0]])
    keys, w = M.token_w_matrix(t, "fixed", "train", ["a", "c"])
    assert np.allclose(w, [[0.5, 0.0, -1.0], [0.0, 1.0, 2.0]])


def test_heuristic_performance_matches_prefix_types():
    keys = ["p1", "p2", "p3", "p4"]
    hrows = [(k, "ph_fixed", x) for k, x in zip(keys, [1.0, 2.0, 3.0, 4.0])]
    hrows += [(k, "ph_mix", x) for k, x in zip(keys, [4.0, 3.0, 2.0, 1.0])]
    hrows += [(k, "selfperp_raw", x) for k, x in zip(keys, [1.0, 1.0, 1.0, 1.0])]  # constant: r undefined
    hrows += [("", "pca_point_fixed_evr1", 0.9)]  # global rows are not heuristics of a prompt
    heur = pa.table({"prompt_key": [r[0] for r in hrows], "metric": [r[1] for r in hrows],
                     "value": [r[2] for r in hrows]})
    sup = pa.table({"prompt_key": keys * 2, "prefix_type": ["fixed"] * 4 + ["mix"] * 4,
                    "suppression": [10.0, 20.0, 30.0, 40.0, 10.0, 20.0, 30.0, 40.0]})
    perf = P.heuristic_performance(heur, sup)
    cols = (perf.column(c).to_pylist() for c in ("metric", "prefix_type", "r", "n"))
    r = {(m, t): (rr, n) for m, t, rr, n in zip(*cols)}
    assert {m for m, _t in r} == {"ph_prefix", "selfperp_raw"}
    assert close(r[("ph_prefix", "fixed")][0], 1.0) and close(r[("ph_prefix", "mix")][0], -1.0)
    x, y = [1, 2, 3, 4, 4, 3, 2, 1], [10, 20, 30, 40] * 2
    assert close(r[("ph_prefix", "all")][0], float(np.corrcoef(x, y)[0, 1])) and r[("ph_prefix", "all")][1] == 8
    assert math.isnan(r[("selfperp_raw", "all")][0])
    assert P.metric_family("ph_mix@french") == ("ph_prefix@french", "mix")
    assert P.metric_family("angle_raw_point_fixed_to_playful") == ("angle_raw_point_prefix_to_playful", "fixed")
    assert P.metric_family("gap_raw_cos_fixed_mix") is None and P.metric_family("selfperp_raw") is None


# ---------------------------------------------------------------------------------------------
# The seed repository's files


def test_import_seed_perplexity_json(tmp_path):
    seed = {
        "params": {"prompts": {"a": "Answer in French.", "b": "The sky is blue."}},
        "baseline": {"lp_train_default": [-1.0, -2.0, -3.0], "lp_ctrl_default": [-1.5, -0.5],
                     "control_completions": ["x", "y"]},
        "prompts": {
            "a": {"prompt": "Answer in French.", "lp_train_inoc": [-0.5, -1.0, -3.5], "lp_ctrl_inoc": [-1.0, -1.0],
                  "lp_train_mix": [-1.0, -1.5, None]},
            "b": {"prompt": "The sky is blue.", "lp_train_inoc": [-1.0, -2.0, -2.0], "lp_ctrl_inoc": [-1.5, -0.5]},
            "c": {"prompt": "Added later.", "lp_train_inoc": [-2.0, -2.0, -2.0]},
        },
    }
    path = tmp_path / "perplexity_heuristic_test.json"
    path.write_text(json.dumps(seed))
    table = import_perplexity_json(path)
    assert table.schema == schema("logprobs")
    assert table.num_rows == 5 + (3 + 2 + 3) + (3 + 2) + 3
    assert table.column("logprob").null_count == table.num_rows  # the seed stores per-token means only
    assert seed_prompts(path) == {"a": "Answer in French.", "b": "The sky is blue.", "c": "Added later."}
    h = as_dict(F.heuristics_table(F.Inputs(logprobs=table), ["scalar"]))
    assert close(h[("a", "ph_fixed")], (0.5 + 1.0 - 0.5) / 3) and close(h[("a", "ppd_fixed")], 0.5)
    assert close(h[("a", "ph_mix")], 0.25)  # the null example is left out: (0 + 0.5) / 2
    assert close(h[("b", "ph_fixed")], 1 / 3) and close(h[("b", "ppd_fixed")], 0.0)
    assert math.isnan(h[("b", "ph_mix")]) and math.isnan(h[("c", "ppd_fixed")])
    tokens = {"baseline": {"lp_train_default_tokens": [[-1.0, -2.0], [-3.0]]},
              "prompts": {"a": {"lp_train_inoc_tokens": [[-0.5, -2.5], [-1.0]], "lp_train_mix_tokens": [[0.0], []]}}}
    tpath = tmp_path / "perplexity_heuristic_tokens_test.json"
    tpath.write_text(json.dumps(tokens))
    t = import_tokens_json(tpath)
    assert t.schema == schema("token_logprobs") and t.num_rows == 6
    assert np.allclose(M.token_w_matrix(t, "fixed", "train", ["a"])[1], [[0.5, -0.5, 2.0]])
    with pytest.raises(ValueError, match="baseline"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        import_perplexity_json(bad)


def test_gap_rank1_fitted_on_the_figures_prompts():
    """Exp 20: v1 is fitted per figure, on one trait's prompts + the neutral ones, not on the whole pass."""
    rng = np.random.default_rng(0)
    keys = {"p1": "t1", "p2": "t1", "p3": "t1", "f1": "t2", "f2": "t2", "f3": "t2", "n1": "n", "n2": "n"}
    wf = {k: rng.normal(size=6) + (2.0 if g == "t1" else 0.0) for k, g in keys.items()}
    wf.update({k: wf[k] + np.r_[0, 0, 0, 3, 3, 3] for k, g in keys.items() if g == "t2"})
    wm = {k: 0.6 * v + rng.normal(scale=0.3, size=6) for k, v in wf.items()}
    rows = [("", "default", "train", e, 0.0) for e in range(6)]
    rows += [(k, t, "train", e, float(x[k][e])) for k in keys for t, x in (("fixed", wf), ("mix", wm))
             for e in range(6)]
    table = logprob_table(rows)
    inp = F.Inputs(logprobs=table, groups=keys, neutral="n")
    assert F.gap_fit_sets(inp, list(keys)) == {"t1": ["p1", "p2", "p3", "n1", "n2"], "t2": ["f1", "f2", "f3", "n1", "n2"]}
    h = as_dict(F.heuristics_table(inp, ["gap"]))
    fig = ["p1", "p2", "p3", "n1", "n2"]
    for method in ("pca", "svd"):
        f, m = G.rank1(np.array([wf[k] for k in fig]), np.array([wm[k] for k in fig]), method)
        whole = G.rank1(np.array([wf[k] for k in keys]), np.array([wm[k] for k in keys]), method)
        want = M.gap_heuristics(f[0], m[0])["ph_ratio"]
        assert close(h[("p1", f"gap_{method}1_ph_ratio")], want, 1e-9)
        assert not close(want, M.gap_heuristics(whole[0][0], whole[1][0])["ph_ratio"], 1e-6)  # all-prompt fit differs
        assert close(h[("p1", f"gap_{method}1_ph_ratio@fit_t1")], want, 1e-9)
        assert math.isnan(h[("p1", f"gap_{method}1_ph_ratio@fit_t2")])  # not in the French-like figure
        # A neutral prompt is in both figures: one value per figure, none unsuffixed.
        assert close(h[("n1", f"gap_{method}1_ph_ratio@fit_t1")], M.gap_heuristics(f[3], m[3])["ph_ratio"], 1e-9)
        assert math.isnan(h[("n1", f"gap_{method}1_ph_ratio")])
    assert close(h[("p1", "gap_raw_ph_ratio")], M.gap_heuristics(wf["p1"], wm["p1"])["ph_ratio"])
    # An explicit fitting set overrides the default; no labels at all: every prompt.
    h = as_dict(F.heuristics_table(F.Inputs(logprobs=table, groups=keys, neutral="n",
                                            gap_fit={"pair": ["p1", "n1"]}), ["gap"]))
    f, m = G.rank1(np.array([wf["p1"], wf["n1"]]), np.array([wm["p1"], wm["n1"]]), "svd")
    assert close(h[("p1", "gap_svd1_ph_ratio")], M.gap_heuristics(f[0], m[0])["ph_ratio"], 1e-9)
    assert math.isnan(h[("p2", "gap_svd1_ph_ratio")])
    assert F.gap_fit_sets(F.Inputs(logprobs=table), list(keys)) == {"all": list(keys)}


def test_import_cli_writes_the_stage_tables_with_the_experiments_groups(tmp_path, capsys, monkeypatch):
    """`python -m raysweep.heuristics import FILE exp=NAME`: a seed per-example file in, the
    stage's tables out, labelled by the experiment's prompt groups so angle summaries exist
    (a bare import without groups would silently give none)."""
    from raysweep.heuristics.__main__ import main

    monkeypatch.chdir(REPO)
    rng = np.random.default_rng(0)
    keys = {"whimsical": "playful", "witty": "playful", "strong_elicitation": "playful",
            "fluent_french": "french", "answer_french": "french", "think_french": "french",
            "the_sky_is_blue": "neutral", "i_like_cats": "neutral"}
    k, c = 6, 4
    base_train, base_ctrl = rng.normal(-2, 0.5, k), rng.normal(-2, 0.5, c)
    prompts = {key: {"lp_train_inoc": list(base_train + rng.normal(0.3 if g != "neutral" else 0.0, 0.2, k)),
                     "lp_ctrl_inoc": list(base_ctrl + rng.normal(0.1, 0.2, c)),
                     "lp_train_mix": list(base_train + rng.normal(0.1, 0.2, k))} for key, g in keys.items()}
    seed = {"params": {"prompts": {key: f"text of {key}" for key in keys}},
            "baseline": {"lp_train_default": list(base_train), "lp_ctrl_default": list(base_ctrl)},
            "prompts": prompts}
    path = tmp_path / "perplexity_heuristic_test.json"
    path.write_text(json.dumps(seed))
    assert main(["import", str(path), "exp=heuristics_playful_french", f"storage={tmp_path}"]) == 0
    out = tmp_path / "heuristics_playful_french"
    h = as_dict(pq.read_table(out / "heuristics.parquet"))
    for key in keys:
        want = float(np.mean(np.array(prompts[key]["lp_train_inoc"]) - base_train))
        assert close(h[(key, "ph_fixed")], want, 1e-9)
    labels = dict(zip(*(pq.read_table(out / "prompts.parquet").column(c).to_pylist() for c in ("prompt_key", "label"))))
    assert labels == keys  # the experiment's heuristics.traits over its prompt_groups
    assert pq.read_table(out / "angles.parquet").num_rows > 0
    # Angle summaries need the groups: per prompt to each group, and across the two traits.
    assert ("fluent_french", "angle_raw_point_fixed_to_neutral") in h and ("whimsical", "angle_raw_point_fixed_to_french") in h
    assert ("", "angle_raw_point_fixed_cross_trait_mean") in h
    assert "imported" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "missing.json"), "exp=heuristics_playful_french",
                 f"storage={tmp_path}"]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err
