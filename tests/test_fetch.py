"""Fetching the seeds' public data (raysweep/data/fetch.py) from a real loopback HTTP mirror
built from the files of ../shared/data: byte-identical results, checksum errors that leave
nothing behind, a download cut off midway and continued with a Range request, a second call
that asks for nothing, an unreachable host, unknown names and the CLI's exit codes. The
registry itself is checked against ../shared/data/SOURCES.tsv and the files' bytes."""

import csv
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mirror_server import Mirror
from tiers import heavy

from raysweep.data import DataError
from raysweep.data.__main__ import main
from raysweep.data.fetch import GROUPS, Source, fetch, fetch_files, load_registry

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "SOURCES.tsv").is_file(), reason=f"no copy of the data at {DATA}")

POOL = "inoculation/rephrasings/be_concise.jsonl"  # 47 kB: big enough to cut midway
EM = "inoculation/em/em_eval_questions.jsonl"
TRAIT = "persona_vectors/eval/evil.json"


def rows(*paths: str) -> list[Source]:
    by_path = {s.path: s for s in load_registry()}
    return [by_path[p] for p in paths]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# A static mirror on loopback: <owner>/<repo>/<commit>/<path>, with Range and two faults


@heavy
@pytest.fixture
def mirror(tmp_path_factory):
    """The mirror, holding the persona_vectors group, POOL and EM."""
    if not (DATA / "SOURCES.tsv").is_file():
        pytest.skip(f"no copy of the data at {DATA}")
    with Mirror(tmp_path_factory.mktemp("mirror"), DATA) as m:
        for s in [s for s in load_registry() if s.group == "persona_vectors"] + rows(POOL, EM):
            m.add(s)
        yield m


# ---------------------------------------------------------------------------------------------
# The registry


@needs_data
def test_registry_is_the_upstream_files_of_the_shared_copy():
    with (DATA / "SOURCES.tsv").open(encoding="utf-8") as fh:
        facts = {r["local_path"]: r for r in csv.DictReader(fh, delimiter="\t")}
    registry = load_registry()
    assert sorted(s.path for s in registry) == sorted(set(facts) - {"inoculation/prompts.json"})
    prefix = {"seed003": "inoculation/rephrasings/", "em": "inoculation/em/", "persona_vectors": "persona_vectors/"}
    assert {s.group for s in registry} == set(GROUPS)
    for s in registry:
        fact = facts[s.path]
        assert s.path.startswith(prefix[s.group]), s
        assert (s.repo, s.upstream_path, s.sha256) == (fact["upstream_repo"], fact["upstream_path"], fact["sha256"])
        assert s.commit == (fact["upstream_commit"] if fact["upstream_commit"] != "-" else "main"), s
        data = (DATA / s.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s.size, s.sha256), s.path


def test_urls_are_raw_github_or_the_mirror_in_the_same_layout():
    [s] = [s for s in load_registry() if s.path == POOL]
    raw = f"slacki-ai/trait-inoculation/{s.commit}/data/rephrasings/be_concise.jsonl"
    assert len(s.commit) == 40
    assert s.url() == f"https://raw.githubusercontent.com/{raw}"
    assert s.url("http://host:8/m/") == f"http://host:8/m/{raw}"


# ---------------------------------------------------------------------------------------------
# Fetching


def test_fetch_of_a_group_gives_the_files_byte_for_byte(mirror, tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("RAYSWEEP_DATA", str(root))  # the default data root
    summary = fetch(["persona_vectors"], mirror=mirror.url)
    assert summary.root == root and len(summary.fetched) == 14 and summary.present == []
    assert leftovers(root) == sorted(summary.fetched)  # no .part left
    for path in summary.fetched:
        assert (root / path).read_bytes() == (DATA / path).read_bytes(), path
    assert summary.bytes == sum(len((DATA / p).read_bytes()) for p in summary.fetched)
    assert len(mirror.requests) == 14 and all(r is None for _, r in mirror.requests)


def test_a_second_call_downloads_nothing(mirror, tmp_path):
    subset = rows(POOL, EM, TRAIT)
    assert len(fetch_files(subset, tmp_path, mirror.url).fetched) == 3
    mirror.requests.clear()
    again = fetch_files(subset, tmp_path, mirror.url)
    assert mirror.requests == [] and again.fetched == [] and again.bytes == 0
    assert again.present == [POOL, EM, TRAIT]


def test_a_present_file_that_does_not_verify_is_fetched_anew(mirror, tmp_path):
    (tmp_path / TRAIT).parent.mkdir(parents=True)
    (tmp_path / TRAIT).write_text("{}")
    assert fetch_files(rows(TRAIT), tmp_path, mirror.url).fetched == [TRAIT]
    assert (tmp_path / TRAIT).read_bytes() == (DATA / TRAIT).read_bytes()


def test_a_checksum_mismatch_is_an_error_and_leaves_nothing(mirror, tmp_path):
    mirror.corrupt = True
    [s] = rows(EM)
    wrong = hashlib.sha256(bytes(b ^ 0x20 for b in (DATA / EM).read_bytes())).hexdigest()
    with pytest.raises(DataError) as err:
        fetch_files([s], tmp_path, mirror.url)
    assert f"{EM}: sha256 mismatch: expected {s.sha256}, got {wrong}" in str(err.value)
    assert leftovers(tmp_path) == []  # neither the file nor its .part


def test_a_download_cut_midway_fails_and_the_next_call_continues_it(mirror, tmp_path):
    [s] = rows(POOL)
    part = tmp_path / (POOL + ".part")
    mirror.cut_after = s.size // 2
    with pytest.raises(DataError, match=r"broke off .* run the fetch again to continue it"):
        fetch_files([s], tmp_path, mirror.url)
    assert not (tmp_path / POOL).exists()
    kept = part.stat().st_size
    assert 0 < kept <= s.size // 2
    summary = fetch_files([s], tmp_path, mirror.url)
    assert mirror.requests[-1] == (f"/{s.repo}/{s.commit}/{s.upstream_path}", f"bytes={kept}-")
    assert summary.bytes == s.size - kept  # only the rest came
    assert (tmp_path / POOL).read_bytes() == (DATA / POOL).read_bytes() and not part.exists()


def test_a_server_that_ignores_range_gives_the_whole_file(mirror, tmp_path):
    [s] = rows(POOL)
    part = tmp_path / (POOL + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes((DATA / POOL).read_bytes()[:1000])
    mirror.ignore_range = True
    summary = fetch_files([s], tmp_path, mirror.url)
    assert [r for _, r in mirror.requests] == ["bytes=1000-"] and summary.bytes == s.size
    assert (tmp_path / POOL).read_bytes() == (DATA / POOL).read_bytes() and not part.exists()


def test_a_stale_part_that_does_not_verify_is_fetched_once_more_from_the_start(mirror, tmp_path):
    [s] = rows(POOL)
    part = tmp_path / (POOL + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # not a prefix of the file: the continued file cannot verify
    fetch_files([s], tmp_path, mirror.url)
    assert [r for _, r in mirror.requests] == ["bytes=1000-", None]
    assert (tmp_path / POOL).read_bytes() == (DATA / POOL).read_bytes() and not part.exists()


def test_an_unreachable_host_names_the_url_and_the_way_out(tmp_path):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    [s] = rows(TRAIT)
    with pytest.raises(DataError) as err:
        fetch_files([s], tmp_path, f"http://127.0.0.1:{port}")
    text = str(err.value)
    assert f"cannot reach {s.url(f'http://127.0.0.1:{port}')}" in text
    assert "RAYSWEEP_DATA=/path/to/copy" in text and "--mirror" in text
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Names and the command line


def test_an_unknown_name_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(DataError, match=r"unknown data name 'nope'; valid names: seed003, em, persona_vectors, all"):
        fetch(["em", "nope"], tmp_path)
    with pytest.raises(DataError, match="no data name given"):
        fetch([], tmp_path)
    assert main(["fetch", "nope", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown data name 'nope'; valid names: seed003, em, persona_vectors, all\n"
    assert leftovers(tmp_path) == []


def test_the_cli_lists_fetch_beside_the_datagen_commands(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(c in out for c in ("fetch", "rephrase", "generate"))
    with pytest.raises(SystemExit) as done:
        main(["rephrase", "--help"])  # still datagen's own parser
    assert done.value.code == 0 and "--prompt" in capsys.readouterr().out


def test_the_cli_fetches_and_exits_2_on_errors_without_a_traceback(mirror, tmp_path):
    env = {**os.environ, "RAYSWEEP_DATA": str(tmp_path / "env")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "raysweep.data", *args], check=False, cwd=REPO,
                              capture_output=True, text=True, timeout=60, env=env)

    done = cli("fetch", "persona_vectors", "--mirror", mirror.url, "--root", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'data'}: 14 files fetched" in done.stdout
    assert (tmp_path / "data" / TRAIT).read_bytes() == (DATA / TRAIT).read_bytes()
    bad = cli("fetch", "nope")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: unknown data name 'nope'; valid names: seed003, em, persona_vectors, all" in bad.stderr
    mirror.corrupt = True
    bad = cli("fetch", "persona_vectors", "--mirror", mirror.url)  # into $RAYSWEEP_DATA
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "sha256 mismatch" in bad.stderr
    assert leftovers(tmp_path / "env") == []
