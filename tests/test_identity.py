"""Vector files in a trial's identity (issue 13 item 6): defense.pps, defense.grad and
eval.reinject vectors are named by path and content (config.vector_key), as model.start
adapter directories are (config.start_key), in the trial id and in the step-0 answer memo.
A vector re-extracted to the same path is a new trial; a copy at another path is another
trial, as a copied adapter directory is; touching a file without changing it is not."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raysweep.config import ConfigError, file_digest, load_config, trial_id, vector_key
from raysweep.eval.evaluate import steering_key
from raysweep.sweep.expand import check_inputs, expand

REPO = Path(__file__).resolve().parents[1]

EXPERIMENT = """\
defaults: [base, _self_]
defense:
  kind: pps
  pps: [{{vector: {pps}, layer: 1, coef: 2.0}}]
  grad: {{mode: attenuate, vector: {grad}}}
eval:
  conditions: [default, training, reinjected]
  reinject: [{{vector: {reinject}, layer: 1, coef: 4.0}}]
sweep:
  arms: [{{defense: {{kind: pps}}}}]
"""


def save(path: Path, value: float) -> Path:
    """A small vector file; its mtime set apart from any earlier write of the same path.

    The digest is kept per (file, size, mtime): a rewrite of the same size within one tick
    of the file system's clock would read as unchanged (a real re-extraction is minutes later).
    """
    old = path.stat().st_mtime_ns if path.exists() else 0
    save_file({"v": torch.full((3, 8), value)}, path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, max(st.st_mtime_ns, old + 10**9)))
    return path


@pytest.fixture
def vectors(tmp_path):
    d = tmp_path / "vectors"
    d.mkdir()
    return {k: save(d / f"{k}.safetensors", v) for k, v in (("pps", 1.0), ("grad", 2.0), ("reinject", 3.0))}


def config(tmp_path, **paths):
    exp = tmp_path / "exp"
    exp.mkdir(exist_ok=True)
    (exp / "vec.yaml").write_text(EXPERIMENT.format(**{k: str(v) for k, v in paths.items()}))
    return load_config("vec", directory=exp)


@pytest.mark.parametrize("which", ["pps", "grad", "reinject"])
def test_same_path_new_content_is_a_new_trial(tmp_path, vectors, which):
    cfg = config(tmp_path, **vectors)
    before = trial_id(cfg)
    others = {k: file_digest(v) for k, v in vectors.items() if k != which}
    save(vectors[which], 9.0)  # re-extracted to the same path
    assert trial_id(cfg) != before
    assert {k: file_digest(v) for k, v in vectors.items() if k != which} == others
    save(vectors[which], {"pps": 1.0, "grad": 2.0, "reinject": 3.0}[which])  # the old content back
    assert trial_id(cfg) == before


def test_touching_a_vector_keeps_the_trial(tmp_path, vectors):
    cfg = config(tmp_path, **vectors)
    before = trial_id(cfg)
    st = vectors["pps"].stat()
    os.utime(vectors["pps"], ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert trial_id(cfg) == before  # content, not mtime


@pytest.mark.parametrize("which", ["pps", "grad", "reinject"])
def test_same_content_at_another_path_is_another_trial(tmp_path, vectors, which):
    """Path and content, as an adapter directory copied elsewhere (test_behaviour)."""
    cfg = config(tmp_path, **vectors)
    copy = tmp_path / f"copy_{which}.safetensors"
    shutil.copyfile(vectors[which], copy)
    assert file_digest(copy) == file_digest(vectors[which])
    moved = config(tmp_path, **{**vectors, which: copy})
    assert trial_id(moved) != trial_id(cfg)
    assert vector_key(str(copy)).split("@")[-1] == vector_key(str(vectors[which])).split("@")[-1]


def test_unused_vectors_stay_out_of_the_id(tmp_path, vectors):
    """grad with mode none and reinject without the reinjected condition: as before, not in the id."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "vec.yaml").write_text(EXPERIMENT.format(**vectors))
    cfg = load_config("vec", ["defense.grad.mode=none", "eval.conditions=[default,training]"], directory=exp)
    before = trial_id(cfg)
    save(vectors["grad"], 7.0)
    save(vectors["reinject"], 7.0)
    assert trial_id(cfg) == before
    save(vectors["pps"], 7.0)
    assert trial_id(cfg) != before


@pytest.mark.parametrize("condition", ["training", "reinjected"])
def test_step0_memo_key_changes_with_content(tmp_path, vectors, condition):
    cfg = config(tmp_path, **vectors)
    which = "pps" if condition == "training" else "reinject"

    def key():
        return json.dumps(steering_key(condition, cfg), default=str)

    before = key()
    assert f"{vectors[which]}@{file_digest(vectors[which])}" in before
    save(vectors[which], 9.0)
    assert key() != before
    assert steering_key("default", cfg) == []


def test_a_missing_vector_is_still_a_config_error(tmp_path, vectors, monkeypatch):
    """The id of a missing file says so (as a missing adapter's does); check_inputs, which runs
    before any training, names the file."""
    monkeypatch.chdir(REPO)  # the default data files are relative to the repository
    gone = tmp_path / "gone.safetensors"
    cfg = config(tmp_path, **{**vectors, "pps": gone})
    assert vector_key(str(gone)) == f"{gone}@missing"
    trials = expand(cfg)
    assert trials and all(t.config.defense.pps[0].vector == str(gone) for t in trials)
    with pytest.raises(ConfigError, match=r"defense.pps: vector file not found: .*gone.safetensors"):
        check_inputs(trials)


def test_a_gguf_model_file_is_named_by_content(tmp_path):
    """model.name=/path/model.gguf: an edited file is a new trial, as a re-extracted vector is."""
    from raysweep.config import load_config, trial_id

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF one")
    cfg = load_config("demo", [f"model.name={model}"])
    first = trial_id(cfg)
    assert trial_id(cfg) == first
    model.write_bytes(b"GGUF two, longer")  # size and mtime change: the digest is taken again
    assert trial_id(cfg) != first
