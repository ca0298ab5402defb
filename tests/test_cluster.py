"""cluster.yaml validates against Ray's own autoscaler schema."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


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
    import pytest

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(config))
