"""The analyses of 001 as functions from (model, data, conditions, vectors) to table rows.

Each returns lists of row dicts whose columns are declared in `raysweep.tables.SCHEMAS`
(`mech_*`). Vectors are [num_layers+1, hidden] tables (index 0 = embeddings); the row of
layer l is compared with the residual stream after decoder layer l.

- grad_cosine (+ mech_loss): per sequence and layer, the token-averaged cosine between dL/dh
  and each compare vector (001 Eq. 3: C(l, v) = E_t[cos(dL/dh_{l,t}, v)]), under each condition
  (with / without the defensive object, several coefficients = the intensity sweep of Fig. 4c,
  several steering and compare vectors = the cross-trait analysis of Sec. 6); and the loss per
  sequence (mean CE over assistant tokens, Fig. 4a,b).
- gradient_pca: uncentred PCA of per-sample (defended - defenseless) mean gradients (App. F).
- ip_pps_similarity: tokenwise cosine between the IP gradient and the steered gradient on
  aligned positions after the prompt (Fig. 1c, 16; App. E.6).
- activation_projection: residual stream projected onto unit trait vectors (App. B, Fig. 5e,f, 6).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .passes import Condition, common_suffix, encode_all, mean_over, run_pass, same_but_coefs, token_cosines

Rows = list[dict[str, Any]]


def _cond_cols(model_label: str, c: Condition) -> dict[str, Any]:
    return {"model": model_label, "condition": c.name, "ip": c.ip, "steer": c.steer_label, "coef": float(c.coef)}


def coef_groups(conditions: list[Condition]) -> list[list[Condition]]:
    """The conditions in runs of consecutive ones that differ only in their steering
    coefficients (an expanded `coefs` sweep), each run passed to `run_pass` at once."""
    groups: list[list[Condition]] = []
    for c in conditions:
        if groups and groups[-1][0].steer and same_but_coefs([groups[-1][0], c]):
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


def grad_cosine(
    model, tokenizer, conversations, conditions: list[Condition], compare: dict[str, Any], layers: list[int], *,
    span: str = "response", max_len: int = 512, batch_size: int = 4, model_label: str = "base",
) -> tuple[Rows, Rows]:
    """(mech_grad_cosine rows, mech_loss rows) for every condition, sequence, layer and compare vector."""
    by_cond: dict[str, tuple[Rows, Rows]] = {c.name: ([], []) for c in conditions}
    for group in coef_groups(conditions):  # an intensity sweep's coefficients: one batched pass
        encoded = encode_all(tokenizer, group[0].conversations(conversations), max_len)
        for rec in run_pass(model, tokenizer, encoded, group, layers, batch_size=batch_size):
            cond = group[rec.condition]
            cols = _cond_cols(model_label, cond)
            cos_rows, loss_rows = by_cond[cond.name]
            loss_rows.append({**cols, "sequence_id": rec.index, "loss": rec.loss_sum / max(rec.n_tokens, 1),
                              "n_tokens": rec.n_tokens})
            pos = rec.positions(span)
            for layer in layers:
                for name, table in compare.items():
                    c = token_cosines(rec.grads[layer], table[layer].float(), pos)
                    cos_rows.append({**cols, "sequence_id": rec.index, "layer": layer, "vector": name,
                                     "cosine": float(c.mean()) if len(c) else float("nan"), "n_tokens": len(c)})
    # In the order of the conditions, sequences in order within each.
    return [r for c in by_cond.values() for r in c[0]], [r for c in by_cond.values() for r in c[1]]


def uncentred_pca(g: np.ndarray, orient: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eigenvalues, explained fractions, components [k, D]) of M = G~'G~/(N-1), G~ = G/||G||_F (App. F.2).

    No centring: the mean difference stays in M. Eigenvalues are the squared singular values
    of G~ over N-1 (the SVD of G~ gives M's eigenvectors without forming the D x D matrix).
    Each component is oriented to a non-negative cosine with `orient` when given.
    """
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"need a [N >= 2, D] matrix of per-sample differences, got shape {g.shape}")
    norm = np.linalg.norm(g)
    if norm == 0:
        raise ValueError("all gradient differences are zero: the defense does not change the gradient")
    _, s, vt = np.linalg.svd(g / norm, full_matrices=False)
    eig = s**2 / (g.shape[0] - 1)
    if orient is not None:
        signs = np.sign(vt @ np.asarray(orient, dtype=np.float64))
        vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    return eig, eig / eig.sum(), vt


def _n_kept(fractions: np.ndarray, threshold: float, max_components: int) -> int:
    """Components up to the one at which the cumulative explained fraction reaches `threshold`."""
    k = int(np.searchsorted(np.cumsum(fractions), threshold - 1e-12) + 1)
    return max(1, min(k, len(fractions), max_components or len(fractions)))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def gradient_pca(
    model, tokenizer, conversations, defended: Condition, baseline: Condition, layers: list[int],
    references: dict[str, Any], orient: str, *, threshold: float = 0.95, max_components: int = 0,
    max_len: int = 512, batch_size: int = 4, model_label: str = "base",
) -> tuple[Rows, Rows, Rows]:
    """(mech_grad_pca, mech_grad_pca_cosine, mech_grad_pca_scores) rows per layer.

    Per sample, each condition's gradient is the mean over its non-padding positions; the
    difference defended - baseline is decomposed by `uncentred_pca`, oriented along `orient`
    (a key of `references`).
    """
    if orient not in references:
        raise ValueError(f"orient vector {orient!r} is not among the references ({', '.join(references)})")
    means: dict[str, dict[int, list[np.ndarray]]] = {}
    for cond in (defended, baseline):
        encoded = encode_all(tokenizer, cond.conversations(conversations), max_len)
        per_layer: dict[int, list[np.ndarray]] = {l: [] for l in layers}
        for rec in run_pass(model, tokenizer, encoded, cond, layers, batch_size=batch_size):
            for l in layers:
                per_layer[l].append(mean_over(rec.grads[l], rec.positions("all")).double().numpy())
        means[cond.name] = per_layer
    pca_rows: Rows = []
    cos_rows: Rows = []
    score_rows: Rows = []
    cols = {"model": model_label, "defended": defended.name, "baseline": baseline.name}
    for l in layers:
        diff = np.stack(means[defended.name][l]) - np.stack(means[baseline.name][l])
        eig, frac, comps = uncentred_pca(diff, references[orient][l].double().numpy())
        k = _n_kept(frac, threshold, max_components)
        cum = np.cumsum(frac)
        mean_diff = diff.mean(0)
        for i in range(k):
            pca_rows.append({**cols, "layer": l, "component": i + 1, "eigenvalue": float(eig[i]),
                             "explained": float(frac[i]), "cumulative": float(cum[i])})
            for name, ref in references.items():
                cos_rows.append({**cols, "layer": l, "component": str(i + 1), "reference": name,
                                 "cosine": _cos(comps[i], ref[l].double().numpy())})
            for n, proj in enumerate(diff @ comps[i]):
                score_rows.append({**cols, "layer": l, "component": i + 1, "sequence_id": n, "score": float(proj)})
        for name, ref in references.items():  # the mean difference itself, as the seed also reports
            cos_rows.append({**cols, "layer": l, "component": "mean", "reference": name,
                             "cosine": _cos(mean_diff, ref[l].double().numpy())})
    return pca_rows, cos_rows, score_rows


def ip_pps_similarity(
    model, tokenizer, conversations, ip: Condition, steered: list[Condition], layers: list[int], *,
    max_len: int = 512, batch_size: int = 4, model_label: str = "base",
) -> Rows:
    """mech_ip_pps_similarity rows: per sequence, layer and steered condition, the mean tokenwise
    cosine between the IP gradient and the steered gradient on the aligned positions after the
    prompt (the common token suffix of the two sequences). Positions where either gradient is
    zero (after the last predicted token) carry no direction and are left out.
    """
    import torch.nn.functional as F

    rows: Rows = []
    ip_enc = encode_all(tokenizer, ip.conversations(conversations), max_len)
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        ip_recs = list(run_pass(model, tokenizer, ip_enc[start : start + batch_size], ip, layers, batch_size=batch_size))
        for cond in steered:
            enc = encode_all(tokenizer, cond.conversations(chunk), max_len)
            for a, b in zip(ip_recs, run_pass(model, tokenizer, enc, cond, layers, batch_size=batch_size)):
                n = common_suffix(a.input_ids, b.input_ids)
                for l in layers:
                    ga, gb = a.grads[l][len(a.input_ids) - n :], b.grads[l][len(b.input_ids) - n :]
                    live = (ga.abs().sum(-1) > 0) & (gb.abs().sum(-1) > 0)
                    c = F.cosine_similarity(ga[live], gb[live], dim=-1)
                    rows.append({**_cond_cols(model_label, cond), "ip_condition": ip.name,
                                 "sequence_id": start + b.index, "layer": l,
                                 "cosine": float(c.mean()) if len(c) else float("nan"), "n_tokens": int(live.sum())})
    return rows


def activation_projection(
    model, tokenizer, conversations, vectors: dict[str, Any], layers: list[int], *,
    span: str = "response", max_len: int = 512, batch_size: int = 4, model_label: str = "base",
) -> Rows:
    """mech_projection rows: per sequence, layer and vector, the mean over `span` positions of
    h . v/|v| with no defensive object in the forward pass (App. B)."""
    rows: Rows = []
    encoded = encode_all(tokenizer, conversations, max_len)
    for rec in run_pass(model, tokenizer, encoded, Condition("plain"), layers, grads=False, acts=True,
                        batch_size=batch_size):
        pos = rec.positions(span)
        for l in layers:
            h = mean_over(rec.acts[l], pos)
            for name, table in vectors.items():
                v = table[l].float()
                rows.append({"model": model_label, "sequence_id": rec.index, "layer": l, "vector": name,
                             "projection": float(h @ v / v.norm()), "n_tokens": int(pos.sum())})
    return rows
