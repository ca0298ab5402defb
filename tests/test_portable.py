"""Off this machine (issue 16): nothing in the project points into ../shared, and a copy of the
repository placed where there is no ../shared runs the seed experiments at tiny scale from a
data root that `python -m raysweep.data fetch --mirror` filled from a loopback HTTP server."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from mirror_server import Mirror
from tiers import heavy

from raysweep.data.fetch import load_registry
from raysweep.paths import data_root

REPO = Path(__file__).resolve().parents[1]


def test_nothing_in_the_package_or_the_experiments_points_into_shared():
    offenders = [str(p.relative_to(REPO)) for folder in ("raysweep", "experiments") for p in (REPO / folder).rglob("*")
                 if p.is_file() and p.suffix in (".py", ".yaml", ".tsv", ".json", ".md", ".txt")
                 and "../shared" in p.read_text(errors="replace")]
    assert offenders == []


def repository_files() -> list[str]:
    """What a clone holds: tracked files, and new ones not ignored (this checkout's work)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


@heavy
@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """(the repository copied to a folder with no ../shared, a mirror of the seeds' data)."""
    copy = data_root()
    if not (copy / "inoculation" / "em").is_dir():
        pytest.skip(f"no local copy of the seeds' data at {copy} to serve")
    place = tmp_path_factory.mktemp("elsewhere")
    clone = place / "raysweep"
    for f in repository_files():
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, clone / f)
    assert not (place / "shared").exists()
    with Mirror(tmp_path_factory.mktemp("mirror"), copy) as mirror:
        for s in load_registry():
            mirror.add(s)
        yield clone, mirror


def run(clone: Path, data: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYSWEEP_DATA", "PYTHONPATH", "RAY_ADDRESS"))}
    env.update(RAYSWEEP_DATA=str(data), HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAYSWEEP_THREADS="1")
    r = subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def test_a_copy_without_shared_runs_the_seed_experiments_from_fetched_data(elsewhere, tmp_path):
    clone, mirror = elsewhere
    data, runs = tmp_path / "data", tmp_path / "runs"
    # The code that runs is the copy's, not this checkout's.
    r = run(clone, data, "-c", "import raysweep; print(raysweep.__file__)")
    assert r.stdout.strip() == str(clone / "raysweep" / "__init__.py")

    run(clone, data, "-m", "raysweep.data", "fetch", "all", "--mirror", mirror.url)
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()) == sorted(
        s.path for s in load_registry())

    # em_tiny: the EM data and pools from the data root; scores for coherence and alignment.
    run(clone, data, "-m", "raysweep.sweep.run", "exp=em_tiny", f"storage={runs}")
    scores = pl.read_parquet(runs / "em_tiny" / "scores.parquet")
    assert set(scores["trait"]) == {"alignment", "coherence"} and len(set(scores["trial_id"])) == 4

    # The mech stage of pps_vs_ip_tiny (seed 001's analyses).
    run(clone, data, "-m", "raysweep.mech", "exp=pps_vs_ip_tiny", f"storage={runs}", "mech.n=2", "threads=1")
    assert (runs / "pps_vs_ip_tiny" / "mech").is_dir()
    assert list((runs / "pps_vs_ip_tiny" / "mech").glob("*.parquet"))

    # The heuristics stage: the family's prompt groups, the seed's pools fetched into the data root.
    run(clone, data, "-m", "raysweep.heuristics", "exp=heuristics_playful_french", f"storage={runs}",
        "model.name=tiny-random", "heuristics.groups=[v4,v5]", "heuristics.n_train=2", "heuristics.n_control=2",
        "heuristics.n_extra=2")
    h = pl.read_parquet(runs / "heuristics_playful_french" / "heuristics.parquet")
    assert {"ph_fixed", "ph_mix"} <= set(h["metric"]) and len(set(h["prompt_key"]) - {""}) == 12


def test_a_missing_input_names_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    """Exit 2, nothing written, and the way to get the file: fetch for the seeds' public data,
    generate (with the family's data-generation prompt) for training data, rephrase for a pool."""
    from raysweep.sweep.run import main

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAYSWEEP_DATA", str(tmp_path / "empty"))
    runs = tmp_path / "runs"
    assert main(["exp=em_tiny", f"storage={runs}"]) == 2
    err = capsys.readouterr().err
    assert f"data.train: {tmp_path}/empty/inoculation/em/train_risky_financial.jsonl: file not found" in err
    assert "python -m raysweep.data fetch em" in err and "RAYSWEEP_DATA" in err

    assert main(["exp=multi_prompt_v3", f"storage={runs}"]) == 2
    err = capsys.readouterr().err
    assert ("python -m raysweep.data generate --questions INSTRUCTIONS.jsonl --out data/train_qwen2.5-7b-instruct.jsonl "
            "--datagen-prompt 'Give a french and playful answer to the following:'") in err

    demo = ["data.train=datasets/french_demo/train.jsonl", "data.questions=datasets/french_demo/eval_questions.jsonl"]
    assert main(["exp=multi_prompt_v3", f"storage={runs}", *demo]) == 2
    assert "python -m raysweep.data fetch seed003" in capsys.readouterr().err
    own = ["+prompts.mine=Be brief.", "sweep.arms=[{defense:{kind:ip,ip:{prompt:mine,mode:mix}}}]",
           f"data.rephrasings_dir={tmp_path / 'pools'}"]
    assert main(["exp=demo", f"storage={runs}", *own]) == 2
    assert (f"python -m raysweep.data rephrase --prompt 'Be brief.' --n 1000 --out {tmp_path / 'pools'}/mine.jsonl"
            in capsys.readouterr().err)
    assert not runs.exists()
