"""Reading an experiment's tables for the report, from a directory or an object store.

`load_run(where)` takes an experiment's directory (`runs/demo`) or its URI
(`s3://bucket/prefix/demo`; any scheme of pyarrow.fs, credentials from the environment as
sweep/storage.py says) and reads the same files through a pyarrow filesystem either way: the
sweep's tables (TABLES) and, when present, those of the heuristics and mech stages
(EXTRA_TABLES), each read into memory (a report of a bucket copies no inputs to disk). An
absent or empty table is None; an experiment with no table with rows is a ReportError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl

from ..errors import ConfigError
from ..sweep.storage import ObjectStore, is_uri

TABLES = ("trials", "scores", "losses", "heldout_logprob", "heuristics")
# Tables of other stages, read when present: the heuristics stage's angles, prompts and suppression
# input, a selecting sweep's selection (sweep/select.py), and the mech stage's (under <exp>/mech/)
# gradient cosines and losses.
EXTRA_TABLES = ("angles", "prompts", "suppression", "selection", "mech/grad_cosine", "mech/loss")


class ReportError(ConfigError):
    """No report possible: no experiment directory, no tables (bad input: the CLI exits 2)."""


class Skip(Exception):
    """A chart or table the run's tables cannot support; the message goes on the index page."""


@dataclass
class Run:
    """The experiment's tables (None when absent or empty) and its trials in table order."""

    name: str
    path: str  # the experiment's directory or URI
    trials: pl.DataFrame
    scores: pl.DataFrame | None
    losses: pl.DataFrame | None
    heldout: pl.DataFrame | None
    heuristics: pl.DataFrame | None
    description: str = ""
    extra: dict[str, pl.DataFrame] = field(default_factory=dict)  # EXTRA_TABLES found with rows

    @property
    def order(self) -> list[str]:
        return self.trials["label"].to_list()


def load_run(where: str | Path) -> Run:
    """Read the tables of one experiment (a directory or a URI); ReportError when there are none."""
    where = str(where)
    name = urlsplit(where).path.rstrip("/").rsplit("/", 1)[-1] if is_uri(where) else Path(where).name
    fs, root = _filesystem(where)
    try:
        found = _read_tables(fs, root, where, name)
        description = _description(fs, f"{root}/config.yaml")
    except OSError as exc:  # an unreachable store, a missing bucket, a file that cannot be read
        raise ReportError(f"cannot read the tables of {where}: {exc}") from None
    trials = found.get("trials")
    if trials is None:  # label the trials by id so the score charts still work
        ids = [found[t].select("trial_id") for t in ("scores", "losses", "heldout_logprob") if found.get(t) is not None]
        ids = pl.concat(ids) if ids else pl.DataFrame(schema={"trial_id": pl.String})  # a heuristics-only run
        trials = ids.unique(maintain_order=True).with_columns(
            label=pl.col("trial_id"), status=pl.lit(""), defense=pl.lit(""), prompt=pl.lit(""), mode=pl.lit(""),
            placement=pl.lit(""), control_id=pl.lit(""), neutral_id=pl.lit(""), axes=pl.lit("{}"), steps=pl.lit(-1))
    return Run(name, where, trials, found.get("scores"), found.get("losses"), found.get("heldout_logprob"),
               found.get("heuristics"), description, {t: found[t] for t in EXTRA_TABLES if found.get(t) is not None})


def _filesystem(where: str):
    """(pyarrow filesystem, root path) of a directory or a URI (the store refuses credentials in a URI)."""
    from pyarrow import fs as pafs

    if is_uri(where):
        store = ObjectStore(where, role="report")
        return store.fs, store.root
    return pafs.LocalFileSystem(), Path(where).absolute().as_posix()


def _read_tables(fs, root: str, where: str, name: str) -> dict[str, pl.DataFrame | None]:
    """name -> table (None when empty) of the TABLES and EXTRA_TABLES present under `root`."""
    from pyarrow import fs as pafs

    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ReportError(f"no experiment directory {where} (run `python -m raysweep.run exp={name}` first)")
    names = TABLES + EXTRA_TABLES
    found = {}
    for table, info in zip(names, fs.get_file_info([f"{root}/{t}.parquet" for t in names])):
        if info.type == pafs.FileType.File:
            with fs.open_input_file(info.path) as f:
                df = pl.read_parquet(f)
            found[table] = df if df.height else None
    if not any(df is not None for df in found.values()):
        raise ReportError(f"no tables with rows in {where} (expected {', '.join(t + '.parquet' for t in TABLES)}, "
                          "or the mech stage's mech/*.parquet)")
    return found


def _description(fs, path: str) -> str:
    """The `description` of the experiment's config.yaml ("" when absent or unreadable)."""
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return ""
    import yaml

    with fs.open_input_stream(path) as f:
        text = f.read().decode()
    try:
        return str((yaml.safe_load(text) or {}).get("description") or "")
    except (yaml.YAMLError, AttributeError):
        return ""  # the page loses a sentence, not the report
