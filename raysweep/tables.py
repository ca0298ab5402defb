"""Arrow tables on disk: declared schemas, atomic writes (temp + rename), concatenation.

A table is complete or absent, never partial: every write goes to a temporary name in
the same directory and is renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMAS: dict[str, pa.Schema] = {
    "losses": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()),
         ("grad_norm", pa.float64()), ("n_tokens", pa.int64())]
    ),
    "completions": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("condition", pa.string()),
         ("question_id", pa.int64()), ("sample", pa.int64()), ("prompt", pa.string()), ("completion", pa.string())]
    ),
    "scores": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("condition", pa.string()),
         ("question_id", pa.int64()), ("sample", pa.int64()), ("trait", pa.string()), ("score", pa.float64()),
         ("judge", pa.string()), ("reason", pa.string())]
    ),
    "heldout_logprob": pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64()), ("example_id", pa.int64()),
         ("logprob", pa.float64()), ("n_tokens", pa.int64())]
    ),
}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_table(path: str | Path, table: pa.Table | list[dict[str, Any]], name: str | None = None) -> Path:
    """Write rows or a table as Parquet atomically; `name` picks a declared schema."""
    path = Path(path)
    if not isinstance(table, pa.Table):
        schema = SCHEMAS[name] if name else None
        table = pa.Table.from_pylist(table, schema=schema) if table or schema else pa.table({})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_table(path: str | Path) -> pa.Table:
    return pq.read_table(str(path))


def concat_parts(paths: list[Path], name: str | None = None) -> pa.Table:
    """Concatenate per-trial part files into one table (the declared schema when empty)."""
    tables = [pq.read_table(str(p)) for p in paths]
    if not tables:
        return SCHEMAS[name].empty_table() if name else pa.table({})
    return pa.concat_tables(tables, promote_options="default")
