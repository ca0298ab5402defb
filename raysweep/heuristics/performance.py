"""Exp 22: how well each heuristic predicts suppression (`heuristic_performance.parquet`)."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from .metrics import EPS, NAN, PREFIX_TYPES

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
