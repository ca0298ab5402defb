"""Heuristics from the logprob tables: named functions; results are rows (prompt_key, metric, value).

w_i = lp_variant_i - lp_default_i for completion i (by default the per-token mean logprob,
seed 003's `lp_per_tok`; `value="logprob"` uses the sum). W_fixed / W_mix stack one prompt's
w per row (prompts x examples); the token-wise W concatenates per-token differences over
all completions (prompts x tokens). Conventions (docs/heuristics.md):

- Undefined is NaN, never a sentinel: an empty set, fewer than 2 values for a std, a
  denominator (std, norm, PH_fixed, MALD_fixed, ...) whose magnitude is below EPS.
- std (sigma) has ddof=1, as the seed's `np.std(W, ddof=1)`.
- PCA is mean-centred, TruncatedSVD uncentred (scikit-learn), with scikit-learn's own signs
  (as the seed: `svd_flip(..., u_based_decision=False)`, each component's largest-magnitude
  entry positive); no re-orientation. `evr<j>` = sigma_j^2 / sum sigma^2 of the matrix the
  method decomposes (PCA: centred W, = sklearn's ratio; SVD: uncentred W, the seed's
  published TruncSVD "explained variance"); `svd_..._sklearn_evr<j>` is scikit-learn's
  TruncatedSVD.explained_variance_ratio_ (coordinate variance / total column variance).
- Rank-1 reconstructions (Exp 20, the seed's `compute_pc1_projected_heuristics`): v1 is
  fitted on W_fixed of one fitting set (one Exp 20 figure: a trait's prompts + the neutral
  ones, `Inputs.gap_fit`); both W_fixed and W_mix are projected on it (PCA centred with
  W_fixed's column mean), and W_pc1[n] = score_n * v1.
- Global rows (explained variance, angle summaries) have prompt_key "".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS = 1e-9  # a denominator below this magnitude is treated as zero (the seed's threshold)
NAN = float("nan")
PREFIX_TYPES = ("fixed", "mix")


# ---------------------------------------------------------------------------------------------
# One prompt's w vector


def _finite(w) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64).ravel()
    return w[np.isfinite(w)]


def ph(w) -> float:
    """PH = mean(w): the mean logprob uplift the prefix gives the completions."""
    w = _finite(w)
    return float(w.mean()) if w.size else NAN


def mean_abs(w) -> float:
    """mean |w|: PPD on control completions, MALD on training completions."""
    w = _finite(w)
    return float(np.abs(w).mean()) if w.size else NAN


ppd = mean_abs  # PPD: mean |lp_inoc - lp_default| over control completions (Exp 11)
mald = mean_abs  # MALD: mean absolute logprob drift over training completions (Exp 20)


def gamma(w) -> float:
    """gamma = frac(w > 0)."""
    w = _finite(w)
    return float((w > 0).mean()) if w.size else NAN


def sigma(w) -> float:
    """sigma = std(w), ddof=1."""
    w = _finite(w)
    return float(w.std(ddof=1)) if w.size >= 2 else NAN


def _div(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and abs(b) > EPS else NAN


def snr(w) -> float:
    """SNR = mean(w) / std(w)."""
    return _div(ph(w), sigma(w))


def snr_abs(w) -> float:
    """Unsigned SNR = |mean(w)| / std(w) (seed 003, Exp 20, heuristic 9: |mean(W_mix)| / std(W_mix))."""
    return _div(abs(ph(w)), sigma(w))


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0)) if na > EPS and nb > EPS else NAN


def eff_rank(w) -> float:
    """exp(H(p)), p = |w| / sum|w| (0 log 0 = 0): from 1 (one example) to len(w) (uniform)."""
    a = np.abs(_finite(w))
    total = a.sum()
    if total <= EPS:
        return NAN
    p = a[a > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


GAP_HEURISTICS = ("ph_ratio", "sigma2_diff", "gamma_mix", "snr_mix", "cos_fixed_mix", "eff_rank_mix",
                  "snr_ratio", "mald_ratio", "snr_abs_mix", "snr_abs_ratio")


def gap_heuristics(w_fixed, w_mix) -> dict[str, float]:
    """The ten fixed-vs-mix gap heuristics of Exp 20 for one prompt (w vectors over the same examples)."""
    f, m = np.asarray(w_fixed, dtype=np.float64), np.asarray(w_mix, dtype=np.float64)
    keep = np.isfinite(f) & np.isfinite(m)
    f, m = f[keep], m[keep]
    s_f, s_m = sigma(f), sigma(m)
    return {
        "ph_ratio": _div(ph(m), ph(f)),
        "sigma2_diff": s_m**2 - s_f**2,
        "gamma_mix": gamma(m),
        "snr_mix": snr(m),
        "cos_fixed_mix": cosine(f, m),
        "eff_rank_mix": eff_rank(m),
        "snr_ratio": _div(snr(m), snr(f)),
        "mald_ratio": _div(mean_abs(m), mean_abs(f)),
        "snr_abs_mix": snr_abs(m),
        "snr_abs_ratio": _div(snr_abs(m), snr_abs(f)),
    }


# ---------------------------------------------------------------------------------------------
# W from the tables


def prompt_keys(logprobs) -> list[str]:
    """Prompt keys of a logprobs table, in first-appearance order (the default rows' "" excluded)."""
    return [k for k in dict.fromkeys(logprobs.column("prompt_key").to_pylist()) if k]


def diff_vectors(logprobs, variant: str, set_name: str, value: str = "mean_logprob") -> dict[str, dict[int, float]]:
    """prompt_key -> {example_id: lp_variant - lp_default} on one completion set."""
    cols = {c: logprobs.column(c).to_pylist() for c in ("prompt_key", "variant", "set", "example_id", value)}
    rows = list(zip(*cols.values()))
    default = {e: v for _k, var, s, e, v in rows if var == "default" and s == set_name}
    out: dict[str, dict[int, float]] = {}
    for k, var, s, e, v in rows:
        if var == variant and s == set_name and e in default:
            x = (v if v is not None else NAN) - (default[e] if default[e] is not None else NAN)
            out.setdefault(k, {})[e] = x
    return out


def w_vector(diffs: dict[str, dict[int, float]], key: str) -> np.ndarray:
    """One prompt's w over its examples (in example_id order); empty when the prompt is absent."""
    d = diffs.get(key, {})
    return np.array([d[e] for e in sorted(d)], dtype=np.float64)


def w_matrix(diffs: dict[str, dict[int, float]], keys: list[str]) -> tuple[list[str], np.ndarray]:
    """(keys present, W [prompts x examples]) over the examples every prompt has with finite w."""
    keys = [k for k in keys if k in diffs]
    if not keys:
        return [], np.zeros((0, 0))
    common = sorted(set.intersection(*(set(diffs[k]) for k in keys)))
    w = np.array([[diffs[k][e] for e in common] for k in keys], dtype=np.float64).reshape(len(keys), len(common))
    return keys, w[:, np.isfinite(w).all(axis=0)]


def token_w_matrix(token_logprobs, variant: str, set_name: str, keys: list[str]) -> tuple[list[str], np.ndarray]:
    """(keys present, token-wise W [prompts x all tokens]): per-token differences, concatenated.

    Example k contributes its first L_k tokens, L_k = the fewest tokens any prompt or the
    default has for it (all equal for this engine's own passes; the seed truncates the same
    way); examples a prompt lacks are skipped for all; non-finite differences count as 0.
    """
    t = token_logprobs
    pk, var, st, eid = (t.column(c).to_pylist() for c in ("prompt_key", "variant", "set", "example_id"))
    arr = t.column("token_logprobs").combine_chunks()
    offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)
    seqs: dict[tuple[str, int], np.ndarray] = {}
    for i, (k, v, s, e) in enumerate(zip(pk, var, st, eid)):
        if s == set_name and (v == "default" or (v == variant and k in keys)):
            seqs[("" if v == "default" else k, e)] = values[offsets[i] : offsets[i + 1]]
    keys = [k for k in keys if any(kk == k for kk, _ in seqs)]
    examples = sorted(e for kk, e in seqs if kk == "" and all((k, e) in seqs for k in keys))
    rows = []
    for k in keys:
        parts = []
        for e in examples:
            n = min(len(seqs[(kk, e)]) for kk in [""] + keys)
            parts.append(seqs[(k, e)][:n] - seqs[("", e)][:n])
        rows.append(np.concatenate(parts) if parts else np.zeros(0))
    w = np.array(rows, dtype=np.float64).reshape(len(keys), -1)
    return keys, np.where(np.isfinite(w), w, 0.0)


# ---------------------------------------------------------------------------------------------
# Decompositions and angles


def decompose(w: np.ndarray, method: str, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coordinates [N x k], components [k x D], explained variance ratio [k]) of W's rows.

    method "pca": mean-centred scikit-learn PCA; "svd": uncentred TruncatedSVD. The ratio is
    sigma_j^2 / sum sigma^2 of the decomposed matrix (see `decompose_all`). Components beyond
    what W supports are NaN. Signs are scikit-learn's (module doc).
    """
    coords, comps, evr, _sk = decompose_all(w, method, n_components)
    return coords, comps, evr


def decompose_all(w: np.ndarray, method: str, n_components: int):
    """decompose() plus scikit-learn's own explained_variance_ratio_ (4th item).

    evr[j] = sigma_j^2 / ||X||_F^2, X = W centred (PCA; equal to sklearn's ratio) or W itself
    (SVD: the seed's published TruncSVD "explained variance", Exp 19/20, coords_metadata);
    sklearn's TruncatedSVD ratio is var(coordinate j) / total column variance instead (NaN
    for a single row, whose column variance is 0).
    """
    from sklearn.decomposition import PCA, TruncatedSVD

    n, d = w.shape
    coords = np.full((n, n_components), NAN)
    comps = np.full((n_components, d), NAN)
    evr = np.full(n_components, NAN)
    sk_evr = np.full(n_components, NAN)
    # Centred data of n rows has rank <= n - 1: PCA gets at most n - 1 components.
    k = min(n_components, n, d) if method == "svd" else min(n_components, n - 1, d)
    spread = w - w.mean(axis=0) if method == "pca" else w
    if k < 1 or not np.isfinite(w).all() or float(np.abs(spread).max(initial=0.0)) <= EPS:
        return coords, comps, evr, sk_evr
    if method == "pca":
        model = PCA(n_components=k, svd_solver="full")
    elif method == "svd":
        model = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=10, random_state=0)
    else:
        raise ValueError(f"method must be pca or svd, got {method!r}")
    with np.errstate(invalid="ignore", divide="ignore"):  # the 0-variance ratio is handled below
        x = model.fit_transform(w)
    coords[:, :k], comps[:k] = x, model.components_
    evr[:k] = np.asarray(model.singular_values_, dtype=np.float64) ** 2 / float((spread**2).sum())
    # TruncatedSVD divides by the total column variance, which is 0 for a single row.
    if float(w.var(axis=0).sum()) > EPS:
        sk_evr[:k] = model.explained_variance_ratio_
    return coords, comps, evr, sk_evr


def rank1(w_fixed: np.ndarray, w_mix: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Rank-1 reconstructions score_n * v1 of W_fixed and W_mix on W_fixed's first axis (Exp 20)."""
    _coords, comps, _evr = decompose(w_fixed, method, 1)
    v1 = comps[0]
    mu = w_fixed.mean(axis=0) if method == "pca" else np.zeros(w_fixed.shape[1])
    f, m = (w_fixed - mu) @ v1, (w_mix - mu) @ v1
    return f[:, None] * v1[None, :], m[:, None] * v1[None, :]


def angle_matrix(x: np.ndarray) -> np.ndarray:
    """Pairwise angles (degrees, arccos of the cosine) between the rows of x; NaN for a zero row."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norms) & (norms > EPS)
    unit = np.where(ok[:, None], x / np.where(ok, norms, 1.0)[:, None], NAN)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    a = np.degrees(np.arccos(cos))
    np.fill_diagonal(a, np.where(ok, 0.0, NAN))
    return a


def _stats(values: list[float]) -> dict[str, float]:
    v = _finite(values)
    return {"mean": float(v.mean()) if v.size else NAN, "std": float(v.std(ddof=1)) if v.size >= 2 else NAN,
            "n": float(v.size)}


def pair_category(ga: str | None, gb: str | None, neutral: str) -> str | None:
    """within_<g> | cross_trait | <g>_x_<neutral> for a pair of group labels (None: unlabelled)."""
    if ga is None or gb is None:
        return None
    if ga == gb:
        return f"within_{ga}"
    if neutral in (ga, gb):
        return f"{gb if ga == neutral else ga}_x_{neutral}"
    return "cross_trait"


def angle_summaries(angles: np.ndarray, keys: list[str], groups: dict[str, str],
                    neutral: str) -> dict[str, dict[str, float]]:
    """Mean / std (ddof=1) / n of the pairwise angles per pair category (unordered pairs, i < j)."""
    by: dict[str, list[float]] = {}
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            cat = pair_category(groups.get(keys[i]), groups.get(keys[j]), neutral)
            if cat:
                by.setdefault(cat, []).append(angles[i, j])
    return {cat: _stats(v) for cat, v in sorted(by.items())}


def angle_to_groups(angles: np.ndarray, keys: list[str], groups: dict[str, str]) -> dict[str, dict[str, float]]:
    """prompt -> {group: mean angle to that group's other prompts}."""
    out: dict[str, dict[str, float]] = {}
    for i, k in enumerate(keys):
        for g in sorted(set(groups.values())):
            others = [angles[i, j] for j, kk in enumerate(keys) if j != i and groups.get(kk) == g]
            out.setdefault(k, {})[g] = _stats(others)["mean"]
    return out


def angle_to_centroids(w: np.ndarray, keys: list[str], groups: dict[str, str]) -> dict[str, dict[str, float]]:
    """prompt -> {group: angle between its row and the mean row of the group's other prompts}."""
    out: dict[str, dict[str, float]] = {}
    for i, k in enumerate(keys):
        for g in sorted(set(groups.values())):
            idx = [j for j, kk in enumerate(keys) if j != i and groups.get(kk) == g]
            c = w[idx].mean(axis=0) if idx else np.full(w.shape[1], NAN)
            out.setdefault(k, {})[g] = float(angle_matrix(np.stack([w[i], c]))[0, 1]) if idx else NAN
    return out


# ---------------------------------------------------------------------------------------------
# Metric families over the tables


@dataclass(frozen=True)
class Inputs:
    """What the metric families read."""

    logprobs: Any  # pyarrow Table: the logprobs table
    token_logprobs: Any = None  # pyarrow Table: the token_logprobs table (token-wise metrics)
    selfperp: Any = None  # pyarrow Table: the selfperp table
    groups: dict[str, str] = field(default_factory=dict)  # prompt_key -> trait / group label
    neutral: str = ""  # label of the neutral group in `groups`
    train_set: str = "train"  # completion set of PH, gamma, sigma, SNR, MALD, W
    control_set: str = "control"  # completion set of PPD
    value: str = "mean_logprob"  # mean_logprob (per token, the seed's) | logprob (sum)
    n_components: int = 3  # PCA / TruncatedSVD components
    # Exp 20 rank-1 fitting sets: label -> prompt keys (one seed figure each). Empty: one set per
    # non-neutral label of `groups` (its prompts + the neutral ones), the seed's; no groups: all.
    gap_fit: dict[str, list[str]] = field(default_factory=dict)
    variants: tuple[str, ...] = PREFIX_TYPES  # prefix variants present


Row = tuple[str, str, float]  # (prompt_key, metric, value)


def _sets(inp: Inputs) -> list[str]:
    return list(dict.fromkeys(inp.logprobs.column("set").to_pylist()))


def family_scalar(inp: Inputs) -> list[Row]:
    """ph_<v>, gamma_<v>, sigma_<v>, snr_<v>, snr_abs_<v>, mald_<v> on the training set; ppd_<v> on the control set."""
    rows: list[Row] = []
    keys = prompt_keys(inp.logprobs)
    for v in inp.variants:
        train = diff_vectors(inp.logprobs, v, inp.train_set, inp.value)
        control = diff_vectors(inp.logprobs, v, inp.control_set, inp.value)
        for k in keys:
            w = w_vector(train, k)
            for name, fn in (("ph", ph), ("gamma", gamma), ("sigma", sigma), ("snr", snr), ("snr_abs", snr_abs),
                             ("mald", mald)):
                rows.append((k, f"{name}_{v}", fn(w)))
            rows.append((k, f"ppd_{v}", ppd(w_vector(control, k))))
    return rows


def family_cross(inp: Inputs) -> list[Row]:
    """ph_<v>@<set> and ppd_<v>@<set> on every other completion set (e.g. another trait's completions)."""
    rows: list[Row] = []
    keys = prompt_keys(inp.logprobs)
    for s in _sets(inp):
        if s in (inp.train_set, inp.control_set):
            continue
        for v in inp.variants:
            d = diff_vectors(inp.logprobs, v, s, inp.value)
            for k in keys:
                rows += [(k, f"ph_{v}@{s}", ph(w_vector(d, k))), (k, f"ppd_{v}@{s}", ppd(w_vector(d, k)))]
    return rows


def family_selfperp(inp: Inputs) -> list[Row]:
    """selfperp_raw and selfperp_context: NLL per token of the prompt string."""
    if inp.selfperp is None:
        return []
    t = inp.selfperp
    return [(k, f"selfperp_{kind}", v) for k, kind, v in
            zip(*(t.column(c).to_pylist() for c in ("prompt_key", "kind", "nll_per_token")))]


def _matrices(inp: Inputs, granularity: str, variant: str) -> tuple[list[str], np.ndarray]:
    keys = prompt_keys(inp.logprobs)
    if granularity == "point":
        return w_matrix(diff_vectors(inp.logprobs, variant, inp.train_set, inp.value), keys)
    if inp.token_logprobs is None:
        return [], np.zeros((0, 0))
    return token_w_matrix(inp.token_logprobs, variant, inp.train_set, keys)


def family_decomposition(inp: Inputs) -> list[Row]:
    """{pca,svd}_{point,token}_<v>_{pc,sv}<j> per prompt; global ..._evr<j> (sigma_j^2 / sum sigma^2) and
    svd_..._sklearn_evr<j> (scikit-learn's TruncatedSVD ratio): coordinates and explained variance."""
    rows: list[Row] = []
    for gran in ("point", "token"):
        for v in inp.variants:
            keys, w = _matrices(inp, gran, v)
            if not keys:
                continue
            for method, axis in (("pca", "pc"), ("svd", "sv")):
                coords, _c, evr, sk_evr = decompose_all(w, method, inp.n_components)
                for j in range(inp.n_components):
                    rows.append(("", f"{method}_{gran}_{v}_evr{j + 1}", float(evr[j])))
                    if method == "svd":
                        rows.append(("", f"svd_{gran}_{v}_sklearn_evr{j + 1}", float(sk_evr[j])))
                    rows += [(k, f"{method}_{gran}_{v}_{axis}{j + 1}", float(coords[i, j])) for i, k in enumerate(keys)]
    return rows


def angle_representations(inp: Inputs):
    """Yield (representation, granularity, variant, keys, rows): raw W and its PCA-2 / SVD-2 coordinates."""
    for gran in ("point", "token"):
        for v in inp.variants:
            keys, w = _matrices(inp, gran, v)
            if not keys:
                continue
            yield "raw", gran, v, keys, w
            for method in ("pca", "svd"):
                coords, _c, _e = decompose(w, method, 2)
                yield f"{method}2", gran, v, keys, coords


def family_angles(inp: Inputs) -> list[Row]:
    """Angle summaries per pair category (global) and each prompt's mean angle to every group."""
    rows: list[Row] = []
    for rep, gran, v, keys, x in angle_representations(inp):
        a = angle_matrix(x)
        name = f"angle_{rep}_{gran}_{v}"
        for cat, st in angle_summaries(a, keys, inp.groups, inp.neutral).items():
            rows += [("", f"{name}_{cat}_{s}", val) for s, val in st.items()]
        for k, per in angle_to_groups(a, keys, inp.groups).items():
            rows += [(k, f"{name}_to_{g}", val) for g, val in per.items()]
        if rep == "raw":
            for k, per in angle_to_centroids(x, keys, inp.groups).items():
                rows += [(k, f"{name}_centroid_{g}", val) for g, val in per.items()]
    return rows


def gap_fit_sets(inp: Inputs, keys: list[str]) -> dict[str, list[str]]:
    """label -> the prompts (of `keys`, in their order) whose W_fixed fits that set's rank-1 axis.

    `inp.gap_fit` when given; else the seed's Exp 20 figures: per non-neutral label of
    `inp.groups`, that label's prompts plus the neutral label's; with no labels, every prompt ("all").
    """
    if inp.gap_fit:
        return {label: [k for k in keys if k in set(members)] for label, members in inp.gap_fit.items()}
    labels = [g for g in dict.fromkeys(inp.groups.get(k) for k in keys) if g is not None and g != inp.neutral]
    if not labels:
        return {"all": list(keys)}
    return {g: [k for k in keys if inp.groups.get(k) == g or (inp.neutral and inp.groups.get(k) == inp.neutral)]
            for g in labels}


def family_gap(inp: Inputs) -> list[Row]:
    """gap_raw_<h>; gap_{pca1,svd1}_<h>@fit_<label> per fitting set; gap_{pca1,svd1}_<h> (the prompt's own set).

    The ten Exp 20 heuristics on W and on its rank-1 reconstructions. A rank-1 axis is fitted
    on W_fixed of one fitting set (`gap_fit_sets`); `..@fit_<label>` is NaN for a prompt outside
    that set. `gap_{pca1,svd1}_<h>` is the value from the one set holding the prompt (NaN when
    it is in none or in several, e.g. the neutral prompts shared by two trait figures).
    """
    if not {"fixed", "mix"} <= set(inp.variants):
        return []
    df = diff_vectors(inp.logprobs, "fixed", inp.train_set, inp.value)
    dm = diff_vectors(inp.logprobs, "mix", inp.train_set, inp.value)
    keys = [k for k in prompt_keys(inp.logprobs) if k in df and k in dm]
    if not keys:
        return []
    # One example set for both matrices: the examples with a finite w in every row of both.
    _k, w = w_matrix({**{f"f:{k}": df[k] for k in keys}, **{f"m:{k}": dm[k] for k in keys}},
                     [f"{t}:{k}" for t in "fm" for k in keys])
    wf, wm = w[: len(keys)], w[len(keys) :]
    rows: list[Row] = []
    for i, k in enumerate(keys):
        rows += [(k, f"gap_raw_{name}", val) for name, val in gap_heuristics(wf[i], wm[i]).items()]
    nan_h = dict.fromkeys(GAP_HEURISTICS, NAN)
    own: dict[tuple[str, str], list[dict[str, float]]] = {}
    for label, members in gap_fit_sets(inp, keys).items():
        idx = [keys.index(k) for k in members]
        for method in ("pca", "svd"):
            per: dict[str, dict[str, float]] = {}
            if idx:
                f, m = rank1(wf[idx], wm[idx], method)
                per = {k: gap_heuristics(f[n], m[n]) for n, k in enumerate(members)}
            for k in keys:
                vals = per.get(k, nan_h)
                rows += [(k, f"gap_{method}1_{name}@fit_{label}", val) for name, val in vals.items()]
                if k in per:
                    own.setdefault((k, method), []).append(per[k])
    for k in keys:
        for method in ("pca", "svd"):
            vals = own.get((k, method), [])
            vals = vals[0] if len(vals) == 1 else nan_h
            rows += [(k, f"gap_{method}1_{name}", val) for name, val in vals.items()]
    return rows


# name -> family; config `metrics` picks among these (empty = all).
FAMILIES: dict[str, Callable[[Inputs], list[Row]]] = {
    "scalar": family_scalar,
    "cross": family_cross,
    "selfperp": family_selfperp,
    "decomposition": family_decomposition,
    "angles": family_angles,
    "gap": family_gap,
}


def heuristics_table(inp: Inputs, families: list[str] | tuple[str, ...] = ()):
    """The heuristics table (prompt_key, metric, value) of the chosen families (all when empty)."""
    import pyarrow as pa

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown metric families {unknown}; registered: {', '.join(FAMILIES)}")
    rows = [r for name in (families or FAMILIES) for r in FAMILIES[name](inp)]
    return pa.table({"prompt_key": [r[0] for r in rows], "metric": [r[1] for r in rows],
                     "value": [float(r[2]) for r in rows]},
                    schema=pa.schema([("prompt_key", pa.string()), ("metric", pa.string()), ("value", pa.float64())]))


def angle_table(inp: Inputs):
    """Every pairwise angle: (representation, granularity, variant, prompt_a, prompt_b, angle_deg)."""
    import pyarrow as pa

    out: dict[str, list] = {c: [] for c in ("representation", "granularity", "variant", "prompt_a", "prompt_b",
                                            "angle_deg")}
    for rep, gran, v, keys, x in angle_representations(inp):
        a = angle_matrix(x)
        for i, ka in enumerate(keys):
            for j, kb in enumerate(keys):
                for c, val in zip(out, (rep, gran, v, ka, kb, float(a[i, j]))):
                    out[c].append(val)
    return pa.table(out, schema=pa.schema([("representation", pa.string()), ("granularity", pa.string()),
                                           ("variant", pa.string()), ("prompt_a", pa.string()),
                                           ("prompt_b", pa.string()), ("angle_deg", pa.float64())]))


# ---------------------------------------------------------------------------------------------
# Exp 22: how well each heuristic predicts suppression

_TYPE_SEGMENT = re.compile(r"(?<=_)(fixed|mix)(?=$|[_@])")


def metric_family(metric: str) -> tuple[str, str] | None:
    """("ph_prefix", "fixed") for "ph_fixed": a metric with exactly one prefix-type segment."""
    found = _TYPE_SEGMENT.findall(metric)
    if len(found) != 1:
        return None
    return _TYPE_SEGMENT.sub("prefix", metric), found[0]


def pearson(x, y) -> tuple[float, float, int]:
    """(r, two-sided p, n) over the finite pairs; NaN r and p with < 3 pairs or a constant side."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < 3 or np.ptp(x) <= EPS or np.ptp(y) <= EPS:
        return NAN, NAN, n
    r, p = stats.pearsonr(x, y)
    return float(r), float(p), n


def heuristic_performance(heuristics, suppression):
    """Pearson r of every per-prompt heuristic against suppression: pooled ("all") and per prefix type.

    `suppression` has (prompt_key, prefix_type, suppression). A metric family with both a
    fixed and a mix member (ph_fixed / ph_mix -> "ph_prefix") is matched to each row's own
    prefix type; every other metric gives the same x to both prefix types of a prompt.
    Returns (metric, prefix_type, n, r, p_value).
    """
    import pyarrow as pa

    values: dict[str, dict[str, float]] = {}
    for k, m, v in zip(*(heuristics.column(c).to_pylist() for c in ("prompt_key", "metric", "value"))):
        if k:
            values.setdefault(m, {})[k] = v
    members: dict[str, dict[str, str]] = {}
    for m in values:
        fam = metric_family(m)
        if fam:
            members.setdefault(fam[0], {})[fam[1]] = m
    families = {name: ms for name, ms in members.items() if set(ms) == set(PREFIX_TYPES)}
    in_family = {m for ms in families.values() for m in ms.values()}
    lookups: dict[str, Callable[[str, str], float]] = {
        m: (lambda k, t, m=m: values[m].get(k, NAN)) for m in values if m not in in_family}
    for name, ms in families.items():
        lookups[name] = lambda k, t, ms=ms: values[ms[t]].get(k, NAN) if t in ms else NAN
    sk, st, sv = (suppression.column(c).to_pylist() for c in ("prompt_key", "prefix_type", "suppression"))
    types = ["all"] + [t for t in dict.fromkeys(st)]
    out: dict[str, list] = {c: [] for c in ("metric", "prefix_type", "n", "r", "p_value")}
    for name in sorted(lookups):
        xs = [lookups[name](k, t) for k, t in zip(sk, st)]
        for t in types:
            sel = [i for i, tt in enumerate(st) if t == "all" or tt == t]
            r, p, n = pearson([xs[i] for i in sel], [sv[i] for i in sel])
            for c, val in zip(out, (name, t, n, r, p)):
                out[c].append(val)
    return pa.table(out, schema=pa.schema([("metric", pa.string()), ("prefix_type", pa.string()), ("n", pa.int64()),
                                           ("r", pa.float64()), ("p_value", pa.float64())]))
