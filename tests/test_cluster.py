"""cluster.yaml validates against Ray's own autoscaler schema, and gives a GPU run what it needs:
the `gpu` extra (vLLM) on GPU workers, whose image has the torch that vLLM pins, and the seeds'
data on every node."""

import json
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"

# Facts from package metadata on PyPI, written down when the pins were chosen:
# - vllm 0.29.0 requires `torch==2.13.0` (a CUDA 13 build: nvidia-cutlass-dsl[cu13]);
# - ray 2.60.0 requires `vllm[audio]==0.29.0; extra == "llm"`, and Ray builds its rayproject/ray-llm
#   images from that extra's lock (docker/ray-llm/Dockerfile in ray-project/ray), so the
#   2.60.0 image has vLLM 0.29.0 and hence torch 2.13.0. The plain rayproject/ray images have no torch.
TORCH_OF_VLLM = {"0.29.0": "2.13.0"}
TORCH_OF_IMAGE = {"rayproject/ray-llm:2.60.0-py312-cu130": "2.13.0"}
FETCH = "python -m raysweep.data fetch all"


def _prepared() -> dict:
    """The config as `ray up` uses it: merged over the AWS defaults, setup_commands merged in."""
    return prepare_config(yaml.safe_load(CLUSTER.read_text()))


def _setup_commands(config: dict, node_type: str) -> list[str]:
    """What a node of `node_type` runs: the head's list, or a worker type's own
    `worker_setup_commands`, which replace the merged global list (as the autoscaler does)."""
    if node_type == config["head_node_type"]:
        return config["head_setup_commands"]
    return config["available_node_types"][node_type].get("worker_setup_commands", config["worker_setup_commands"])


def _gpu_types(config: dict) -> list[str]:
    return [t for t in config["available_node_types"] if t != config["head_node_type"]]


def test_cluster_yaml_is_valid_for_the_autoscaler():
    config = yaml.safe_load(CLUSTER.read_text())
    filled = fillout_defaults(config)  # what `ray up` validates: the file merged over the AWS defaults
    validate_config(filled)
    assert filled["head_node_type"] == "head"
    assert {"gpu_worker", "gpu_worker_spot"} <= set(filled["available_node_types"])
    assert filled["available_node_types"]["gpu_worker"]["min_workers"] == 0  # autoscales from zero
    assert any("--dashboard-host=127.0.0.1" in c for c in filled["head_start_ray_commands"])
    assert any("pip install" in c and "raysweep" in c for c in filled["setup_commands"])


def test_schema_rejects_a_broken_cluster_file():
    import jsonschema

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(config))


def test_gpu_workers_install_the_gpu_extra_and_the_head_does_not():
    config = _prepared()
    gpu_types = _gpu_types(config)
    assert set(gpu_types) == {"gpu_worker", "gpu_worker_spot"}
    for node_type in gpu_types:
        commands = _setup_commands(config, node_type)
        assert any(re.search(r"pip install .*/home/ray/raysweep\[gpu\]", c) for c in commands), node_type
    assert not any("[gpu]" in c for c in _setup_commands(config, "head"))


def test_every_node_fetches_the_seed_data():
    config = _prepared()
    for node_type in config["available_node_types"]:
        commands = _setup_commands(config, node_type)
        assert FETCH in commands, node_type
        install = next(i for i, c in enumerate(commands) if "pip install" in c and "/home/ray/raysweep" in c)
        assert install < commands.index(FETCH), f"{node_type}: fetch before the project is installed"
    # The default data root (~/.cache/raysweep/data) on every node: set on some only, it would split the data.
    assert "RAYSWEEP_DATA" not in json.dumps(config)


def test_gpu_extra_pins_the_vllm_whose_torch_the_worker_image_has():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [vllm] = [re.fullmatch(r"vllm==([\d.]+)", r).group(1) for r in extras["gpu"] if r.startswith("vllm")]
    docker = yaml.safe_load(CLUSTER.read_text())["docker"]
    assert docker["worker_image"] in TORCH_OF_IMAGE, "a new worker image: record its torch above"
    assert vllm in TORCH_OF_VLLM, "a new vLLM pin: record the torch it pins above"
    assert TORCH_OF_VLLM[vllm] == TORCH_OF_IMAGE[docker["worker_image"]]
    # One Ray release and one Python on every node, and the Ray that setup_commands pins.
    worker = re.fullmatch(r"rayproject/ray-llm:([\d.]+)-(py\d+)-cu\d+", docker["worker_image"])
    head = re.fullmatch(r"rayproject/ray:([\d.]+)-(py\d+)-\w+", docker["image"])
    assert worker and head and worker.groups() == head.groups(), docker
    setup = " ".join(yaml.safe_load(CLUSTER.read_text())["setup_commands"])
    assert f"ray[default,tune,data]=={worker.group(1)}" in setup
