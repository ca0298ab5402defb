"""One prompt's w vector and the W matrices from the logprob tables, and the scalar metrics of w.

w_i = lp_variant_i - lp_default_i for completion i (by default the per-token mean logprob,
seed 003's `lp_per_tok`; `value="logprob"` uses the sum). W_fixed / W_mix stack one prompt's
w per row (prompts x examples); the token-wise W concatenates per-token differences over
all completions (prompts x tokens). Conventions (docs/heuristics.md), shared by
`geometry.py` (PCA / SVD, angles), `families.py` (the named metric families and the
tables) and `performance.py` (Exp 22):

- Undefined is NaN, never a sentinel: an empty set, fewer than 2 values for a std, a
  denominator (std, norm, PH_fixed, MALD_fixed, ...) whose magnitude is below EPS.
- std (sigma) has ddof=1, as the seed's `np.std(W, ddof=1)`.
"""

from __future__ import annotations

import math

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
