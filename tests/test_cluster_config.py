"""cluster.yaml is valid against Ray's own cluster-config schema."""
import json
import os
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_ray_schema():
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"].startswith("rayproject/ray:") and "gpu" in config["docker"]["image"]
    assert any("pip install" in c for c in config["setup_commands"])


def test_schema_check_would_catch_a_broken_config():
    import pytest

    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
