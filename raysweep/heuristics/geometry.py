"""Decompositions and angles of the W matrices (`metrics.py` builds them).

- PCA is mean-centred, TruncatedSVD uncentred (scikit-learn), with scikit-learn's own signs
  (as the seed: `svd_flip(..., u_based_decision=False)`, each component's largest-magnitude
  entry positive); no re-orientation. `evr<j>` = sigma_j^2 / sum sigma^2 of the matrix the
  method decomposes (PCA: centred W, = sklearn's ratio; SVD: uncentred W, the seed's
  published TruncSVD "explained variance"); `svd_..._sklearn_evr<j>` is scikit-learn's
  TruncatedSVD.explained_variance_ratio_ (coordinate variance / total column variance).
- Rank-1 reconstructions (Exp 20, the seed's `compute_pc1_projected_heuristics`): v1 is
  fitted on W_fixed of one fitting set (one Exp 20 figure: a trait's prompts + the neutral
  ones, `families.Inputs.gap_fit`); both W_fixed and W_mix are projected on it (PCA centred
  with W_fixed's column mean), and W_pc1[n] = score_n * v1.
- Angles are in degrees (arccos of the cosine); std has ddof=1; undefined is NaN.
"""

from __future__ import annotations

import numpy as np

from .metrics import EPS, NAN, _finite


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
