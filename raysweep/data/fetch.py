"""Fetch the seeds' public data from its upstream GitHub sources into the data root.

`python -m raysweep.data fetch NAME... [--mirror URL] [--root DIR]`, NAME one of seed003
(the rephrasing pools), em (the emergent-misalignment data and its pools), persona_vectors
(the trait definitions) or all. The registry, raysweep/data/sources.tsv, names every file:
its group, its path under the data root, the repository, the pinned commit (or a ref where
none is pinned), the path there, its sha256 and its size. The data root is $RAYSWEEP_DATA,
else ~/.cache/raysweep/data (raysweep/paths.py).

A file at its final path is always complete and verified: it is downloaded into
`<path>.part` beside it, its sha256 is checked, and only then is it renamed into place. A
wrong digest is an error naming the file and both digests, and nothing of the download is
kept. A file already present and verified is not asked for again (one that does not verify
is fetched anew). A `.part` left by an interrupted fetch is continued with an HTTP Range
request; from the start when the server ignores Range, or once more when the continued file
does not verify (stale bytes from an older download).

Files come from raw.githubusercontent.com, or from `--mirror URL` laid out the same way:
`URL/<owner>/<repo>/<commit>/<path>`. A failure is not retried here: it names the URL, and
running the same command again continues where it stopped. Offline, point the data root at
a copy of the data instead ($RAYSWEEP_DATA=/path/to/copy).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import DATA_ENV, data_root
from . import DataError

REGISTRY = Path(__file__).with_name("sources.tsv")
GITHUB_RAW = "https://raw.githubusercontent.com"
GROUPS = ("seed003", "em", "persona_vectors")
NAMES = (*GROUPS, "all")
CHUNK = 1 << 16  # bytes per hash update
TIMEOUT = 30.0  # seconds to connect, and between two reads of a response


@dataclass(frozen=True)
class Source:
    group: str  # seed003 | em | persona_vectors
    path: str  # under the data root, e.g. inoculation/rephrasings/be_concise.jsonl
    repo: str  # owner/name on GitHub
    commit: str  # the pinned commit, or a ref (main) where none could be pinned
    upstream_path: str  # the file's path in the repository
    sha256: str  # of the file's bytes
    size: int  # bytes

    def url(self, mirror: str | None = None) -> str:
        """raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>, or the same under a mirror."""
        return f"{(mirror or GITHUB_RAW).rstrip('/')}/{self.repo}/{self.commit}/{self.upstream_path}"


@dataclass
class Summary:
    root: Path  # the data root fetched into
    fetched: list[str] = field(default_factory=list)  # paths downloaded by this call
    present: list[str] = field(default_factory=list)  # paths already there and verified
    bytes: int = 0  # bytes received by this call


def load_registry(path: str | Path = REGISTRY) -> list[Source]:
    """The registry's rows ('#' lines are comments); a malformed row names file and line."""
    sources = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        local = Path(cols[1]) if len(cols) > 1 else Path("/")
        if len(cols) != 7 or cols[0] not in GROUPS or not cols[6].isdigit() or local.is_absolute() \
                or ".." in local.parts:
            raise DataError(f"{path}:{lineno}: expected group ({', '.join(GROUPS)}), relative path, repo, commit, "
                            f"upstream path, sha256, bytes, tab-separated; got {line!r}")
        sources.append(Source(*cols[:6], int(cols[6])))
    return sources


def select(names: list[str] | tuple[str, ...], sources: list[Source] | None = None) -> list[Source]:
    """The registry rows of the named groups ("all": every group)."""
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        what = f"unknown data name {', '.join(map(repr, unknown))}" if unknown else "no data name given"
        raise DataError(f"{what}; valid names: {', '.join(NAMES)}")
    groups = set(GROUPS) if "all" in names else set(names)
    return [s for s in (load_registry() if sources is None else sources) if s.group in groups]


def fetch(names: list[str] | tuple[str, ...], root: str | Path | None = None, mirror: str | None = None) -> Summary:
    """Fetch the named groups into the data root (default data_root()); see the module docstring."""
    return fetch_files(select(names), root, mirror)


def fetch_files(sources: list[Source], root: str | Path | None = None, mirror: str | None = None) -> Summary:
    """Fetch these registry rows into the data root: what `fetch` does once the names are resolved."""
    import httpx
    from tqdm import tqdm

    summary = Summary(Path(root).expanduser() if root else data_root())
    todo = []
    for s in sources:
        if _verified(summary.root / s.path, s):
            summary.present.append(s.path)
        else:
            todo.append(s)
    if not todo:
        return summary
    # identity: a Range counts bytes of the encoded body, so a compressed reply could not be continued
    client = httpx.Client(timeout=TIMEOUT, follow_redirects=True, headers={"Accept-Encoding": "identity"})
    with client, tqdm(total=sum(s.size for s in todo), desc="fetch", unit="B", unit_scale=True) as bar:
        for i, s in enumerate(todo, 1):
            bar.set_postfix_str(f"file {i}/{len(todo)}")
            final = summary.root / s.path
            try:
                summary.bytes += _fetch_one(client, s, final, s.url(mirror), bar)
            except OSError as exc:  # the data root is not writable, the disk is full, ...
                raise DataError(f"{final}: cannot write: {exc}") from None
            summary.fetched.append(s.path)
    return summary


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, s: Source) -> bool:
    return path.is_file() and path.stat().st_size == s.size and sha256_of(path) == s.sha256


def _fetch_one(client, s: Source, final: Path, url: str, bar) -> int:
    """Download (or continue) `<final>.part`, verify it, rename it to `final`; bytes received."""
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    if part.is_file() and part.stat().st_size > s.size:
        part.unlink()  # longer than the file: not a prefix of it
    resumed = part.is_file()
    received = _download(client, url, part, bar) if not resumed or part.stat().st_size < s.size else 0
    digest = sha256_of(part)
    if digest != s.sha256:
        bar.update(-part.stat().st_size)
        part.unlink()
        if resumed:  # the kept bytes may come from an older download: once more from the start
            return received + _fetch_one(client, s, final, url, bar)
        moved = "" if len(s.commit) == 40 else f"; it is fetched at the ref {s.commit!r}, which upstream may have moved"
        raise DataError(f"{s.path}: sha256 mismatch: expected {s.sha256}, got {digest} from {url}; "
                        f"the download was discarded{moved}")
    os.replace(part, final)
    return received


def _download(client, url: str, part: Path, bar) -> int:
    """Append the rest of the file to `part` (all of it when the server ignores Range); bytes received."""
    import httpx

    have = part.stat().st_size if part.is_file() else 0
    bar.update(have)
    received = 0
    try:
        with client.stream("GET", url, headers={"Range": f"bytes={have}-"} if have else {}) as r:
            if have and (r.status_code == 416 or r.status_code == 206 and _range_start(r) != have):
                bar.update(-have)
                part.unlink()  # the server cannot continue these bytes: start over
                return _download(client, url, part, bar)
            if r.status_code not in (200, 206):
                raise DataError(f"cannot fetch {url}: HTTP {r.status_code} {r.reason_phrase}; {_offline_hint()}")
            if r.status_code == 200 and have:
                bar.update(-have)  # Range ignored: the whole file comes again
            with part.open("ab" if r.status_code == 206 else "wb") as fh:
                for chunk in r.iter_bytes():  # as it arrives: a cut-off keeps all that came
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise DataError(f"cannot reach {url} ({type(exc).__name__}: {exc}); {_offline_hint()}") from None
    except httpx.TransportError as exc:  # cut off, timed out: keep what came
        raise DataError(f"download of {url} broke off after {received} bytes ({type(exc).__name__}: {exc}); "
                        f"{part.name} is kept: run the fetch again to continue it") from None
    return received


def _range_start(response) -> int | None:
    """First byte of a 206 reply, from `Content-Range: bytes START-END/TOTAL`."""
    value = response.headers.get("content-range", "")
    unit, _, spec = value.partition(" ")
    start = spec.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _offline_hint() -> str:
    return (f"without access to it, point the data root at a copy of the data ({DATA_ENV}=/path/to/copy) "
            "or fetch from a mirror (--mirror URL, laid out as URL/<owner>/<repo>/<commit>/<path>)")


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysweep.data fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="seed003 (rephrasing pools), em (emergent-misalignment data), persona_vectors "
                        "(trait definitions) or all")
    p.add_argument("--mirror", metavar="URL", help="fetch from URL/<owner>/<repo>/<commit>/<path> instead of "
                                    "raw.githubusercontent.com")
    p.add_argument("--root", type=Path, metavar="DIR",
                   help=f"data root (default ${DATA_ENV}, else ~/.cache/raysweep/data)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = fetch(args.names, args.root, args.mirror)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print(f"{summary.root}: {len(summary.fetched)} files fetched ({summary.bytes / 1e6:.1f} MB), "
          f"{len(summary.present)} already present")
    return 0
