"""The named metric families over the logprob tables, and the heuristics and angle tables.

Each family maps `Inputs` to rows (prompt_key, metric, value); `FAMILIES` registers them
(config `heuristics.metrics` picks among them) and `heuristics_table` / `angle_table` build
the stage's tables. Global rows (explained variance, angle summaries) have prompt_key "".
Conventions: `metrics.py` (w, W, NaN, ddof) and `geometry.py` (PCA / SVD, rank-1, angles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import (
    angle_matrix,
    angle_summaries,
    angle_to_centroids,
    angle_to_groups,
    decompose,
    decompose_all,
    rank1,
)
from .metrics import (
    GAP_HEURISTICS,
    NAN,
    PREFIX_TYPES,
    diff_vectors,
    gamma,
    gap_heuristics,
    mald,
    ph,
    ppd,
    prompt_keys,
    sigma,
    snr,
    snr_abs,
    token_w_matrix,
    w_matrix,
    w_vector,
)


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
