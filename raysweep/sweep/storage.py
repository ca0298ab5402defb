"""Where an experiment's results live: a local directory, or an object store (s3://, gs://).

A local `storage` is used in place: the driver and the trials read and write it directly
(on several machines it must be a directory every node mounts); every method here is
then a no-op.

An object-store URI (`storage=s3://bucket/prefix`; gs:// and the other schemes of
pyarrow.fs too) is mirrored through node-local scratch directories ($RAYSWEEP_SCRATCH,
default <tmp>/raysweep-scratch), so any node can run, resume or evaluate any trial:
- a trial first pulls its directory (resume state, losses, eval parts, done marker,
  attempts) from the store, so a trial rescheduled on another node resumes from its last
  mirrored state; after every saved state and at the end it pushes that directory and its
  new adapters;
- the driver pulls the trials' markers and parts (not their resume states), gathers the
  experiment's tables locally and pushes them.

Consistency: a push uploads files oldest first, i.e. in the order the trial wrote them, so
a pointer (resume.json, the parts of an evaluated step, done.json) reaches the store only
after what it points to, and files gone locally (replaced resume states) are deleted from
the store only after that. Each file is one object written by a single upload (S3: a
multipart upload that becomes visible only when completed; GCS likewise): a reader sees
the whole new object or the old one, never a part, so tables on the store are complete or
absent without temporary keys (S3 has no atomic rename to build them on).

Credentials come from the environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE, instance roles; GOOGLE_APPLICATION_CREDENTIALS for gs://);
a URI carrying them is refused, since the URI is written into configs and logs. An
S3-compatible server (MinIO, Ceph, moto) is named by AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, or in the URI: s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError

SCRATCH_ENV = "RAYSWEEP_SCRATCH"


class StorageError(ConfigError):
    """The results storage cannot be used (unreachable, missing bucket, not writable)."""


class Store(Protocol):
    """An experiment's results: `exp_dir` is where this process reads and writes them."""

    uri: str  # where the results land, for messages and for the trials
    exp_dir: Path

    def pull(self, rel: str, skip: tuple[str, ...] = ()) -> None: ...

    def push(self, rel: str, recursive: bool = True, mirror: bool = False) -> None: ...

    def discard(self, rel: str) -> None: ...

    def tune_path(self) -> str: ...


def is_uri(storage: str) -> bool:
    return "://" in storage


def open_store(storage: str, name: str, role: str = "driver") -> Store:
    """The results of experiment `name` under `storage` (a directory or a URI).

    A URI is checked before anything runs: unreachable, missing bucket or not writable
    raise StorageError. `role` keeps the scratch copies of the driver and of trials apart.
    """
    if not is_uri(storage):
        return LocalStore(Path(storage) / name)
    store = ObjectStore(join_uri(storage, name), role)
    store.check()
    return store


def open_experiment(uri: str, role: str = "trial") -> Store:
    """An experiment already checked by the driver: its directory or its URI."""
    return ObjectStore(uri, role) if is_uri(uri) else LocalStore(Path(uri))


def join_uri(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path (its query, e.g. endpoint_override, kept)."""
    u = urlsplit(uri)
    return urlunsplit(u._replace(path="/".join([u.path.rstrip("/"), *parts])))


def scratch_root() -> Path:
    return Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "raysweep-scratch")


@dataclass
class LocalStore:
    """A directory used in place: nothing to copy."""

    exp_dir: Path

    @property
    def uri(self) -> str:
        return str(self.exp_dir)

    def pull(self, rel: str, skip: tuple[str, ...] = ()) -> None:
        pass

    def push(self, rel: str, recursive: bool = True, mirror: bool = False) -> None:
        pass

    def discard(self, rel: str) -> None:
        pass

    def tune_path(self) -> str:
        return str((self.exp_dir / "tune").resolve())


class ObjectStore:
    """An experiment directory on a pyarrow filesystem, mirrored in node-local scratch."""

    def __init__(self, uri: str, role: str):
        from pyarrow import fs as pafs

        u = urlsplit(uri)
        if "@" in u.netloc:
            raise ConfigError(
                f"storage: put credentials in the environment (e.g. AWS_ACCESS_KEY_ID), not in the URI "
                f"({u.scheme}://...@{u.netloc.rsplit('@', 1)[1]}{u.path})"
            )
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise StorageError(f"storage={uri!r}: {exc}") from None
        self.uri = uri
        self.exp_dir = scratch_root() / role / u.scheme / self.root
        self.local = pafs.LocalFileSystem()
        self._known: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) of a local file the store has

    def check(self) -> None:
        """Write and delete a probe object: fail now, before any trial starts, if that is impossible."""
        probe = f"{self.root}/.raysweep-probe-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(probe) as out:
                out.write(b"")
            self.fs.delete_file(probe)
        except OSError as exc:
            raise StorageError(f"storage={self.uri!r} is not reachable or not writable: {exc}") from None

    def tune_path(self) -> str:
        return join_uri(self.uri, "tune")

    def pull(self, rel: str, skip: tuple[str, ...] = ()) -> None:
        """Make exp_dir/rel a copy of the store's rel, leaving out paths with a part starting with `skip`."""
        remote = {r: info for r, info in self._remote_files(rel).items() if not _skipped(r, skip)}
        local = {r: st for r, st in self._local_files(rel).items() if not _skipped(r, skip)}
        for r in local.keys() - remote.keys():
            (self.exp_dir / r).unlink()
            self._known.pop(r, None)
        for r, info in remote.items():
            if local.get(r) != (info.size, info.mtime_ns):
                self._download(r, info.mtime_ns)
            self._known[r] = (info.size, info.mtime_ns)

    def push(self, rel: str, recursive: bool = True, mirror: bool = False) -> None:
        """Upload exp_dir/rel's new and changed files, oldest first; with `mirror`, then delete
        the store's files under rel that are gone locally."""
        local = self._local_files(rel, recursive)
        for _, r in sorted((st[1], r) for r, st in local.items() if self._known.get(r) != st):
            self._upload(r)
            self._known[r] = local[r]
        if mirror:
            for r in self._remote_files(rel).keys() - local.keys():
                self.fs.delete_file(f"{self.root}/{r}")
                self._known.pop(r, None)

    def discard(self, rel: str) -> None:
        """Delete the scratch copy of `rel` (the store keeps it): a finished trial frees the node's disk."""
        shutil.rmtree(self.exp_dir / rel, ignore_errors=True)
        self._known = {r: st for r, st in self._known.items() if not (r == rel or r.startswith(f"{rel}/"))}

    def _upload(self, rel: str) -> None:
        from pyarrow import fs as pafs

        pafs.copy_files(str(self.exp_dir / rel), f"{self.root}/{rel}",
                        source_filesystem=self.local, destination_filesystem=self.fs)

    def _download(self, rel: str, mtime_ns: int) -> None:
        """Copy one object to a temporary name, then rename it into place with the object's mtime."""
        from pyarrow import fs as pafs

        dest = self.exp_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.pull{os.getpid()}")
        pafs.copy_files(f"{self.root}/{rel}", str(tmp), source_filesystem=self.fs, destination_filesystem=self.local)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, dest)

    def _remote_files(self, rel: str) -> dict:
        """rel path -> FileInfo of the store's files under `rel`, or of `rel` itself (hidden names left out)."""
        from pyarrow import fs as pafs

        base = f"{self.root}/{rel}".rstrip("/")
        one = self.fs.get_file_info(base)
        infos = [one] if one.type == pafs.FileType.File else \
            self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = {i.path[len(self.root) + 1:]: i for i in infos if i.type == pafs.FileType.File}
        return {r: i for r, i in files.items() if not _hidden(r)}

    def _local_files(self, rel: str, recursive: bool = True) -> dict[str, tuple[int, int]]:
        """rel path -> (size, mtime_ns) of the files under exp_dir/rel (hidden temporaries left out)."""
        top = self.exp_dir / rel
        if top.is_file():
            paths = [top]
        else:
            paths = [p for p in (top.rglob("*") if recursive else top.glob("*")) if p.is_file()]
        out = {}
        for p in paths:
            r = p.relative_to(self.exp_dir).as_posix()
            if not _hidden(r):
                st = p.stat()
                out[r] = (st.st_size, st.st_mtime_ns)
        return out


def _hidden(rel: str) -> bool:
    """Temporaries (.name.tmp, probes) start with a dot and never travel."""
    return any(part.startswith(".") for part in rel.split("/"))


def _skipped(rel: str, skip: tuple[str, ...]) -> bool:
    return any(part.startswith(s) for part in rel.split("/") for s in skip)
