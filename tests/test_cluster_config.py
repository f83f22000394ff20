"""cluster.yaml is a valid Ray cluster launcher config and keeps its structural promises.

Validation uses Ray's own code path of `ray up`: `prepare_config` (merge the AWS defaults, merge
setup commands, check the docker section, fill per-type worker limits) and then
`validate_config` (jsonschema against ray/autoscaler/ray-schema.json plus Ray's extra checks).
Nothing here talks to AWS.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
PYPROJECT = REPO_ROOT / "pyproject.toml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# Dependencies every node must install for the decode stages (named in the brief and the README).
REQUIRED_SETUP_PACKAGES = ("pydicom", "opencv-python-headless")


def _load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before touching the cloud; raises on an invalid config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _load()


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {name: t for name, t in config["available_node_types"].items() if name != head}


def _requirements(config: dict[str, Any], remote: str) -> list[str]:
    """The lines of a requirements file that file_mounts copies to `remote` (read from the repository)."""
    local = config["file_mounts"][remote]
    return [line.strip() for line in (REPO_ROOT / local).read_text().splitlines() if line.strip() and not line.startswith("#")]


def _pip_specs(config: dict[str, Any], commands: list[str]) -> list[str]:
    """Every requirement that these `pip install` commands install, `-r` files followed."""
    specs: list[str] = []
    for command in commands:
        words = shlex.split(command)
        if "pip" not in words or "install" not in words:
            continue
        rest = words[words.index("install") + 1 :]
        for i, word in enumerate(rest):
            if word == "-r":
                specs += _requirements(config, rest[i + 1])
            elif not word.startswith("-") and (i == 0 or rest[i - 1] not in ("-r", "--index-url")):
                specs.append(word)
    return specs


def _name(spec: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()


def _setup_packages(config: dict[str, Any]) -> set[str]:
    """Bare distribution names that every node installs (setup_commands), extras and pins dropped."""
    return {_name(spec) for spec in _pip_specs(config, config.get("setup_commands", []))}


# --- schema -----------------------------------------------------------------------------------


def test_raw_file_matches_ray_schema(config):
    schema = json.loads(RAY_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validate(config, schema)


def test_passes_ray_prepare_and_validate(config):
    prepared = _ray_validate(config)
    # Our setup commands reach the workers (merged in by prepare_config) ...
    assert prepared["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    # ... and we did not drop the AWS default head setup (boto3 for the autoscaler).
    assert any("boto3" in c for c in prepared["head_setup_commands"])


def _unknown_top_level_key(c):
    c["max_worker"] = 3  # typo of max_workers


def _unknown_node_type_key(c):
    c["available_node_types"]["gpu_worker"]["min_worker"] = 0


def _fractional_gpu(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _missing_node_config(c):
    del c["available_node_types"]["cpu_worker"]["node_config"]


def _unknown_head_type(c):
    c["head_node_type"] = "no_such_type"


def _min_workers_above_max(c):
    c["available_node_types"]["cpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    "break_it",
    [
        _unknown_top_level_key,
        _unknown_node_type_key,
        _fractional_gpu,
        _missing_node_config,
        _unknown_head_type,
        _min_workers_above_max,
    ],
)
def test_ray_validation_rejects_broken_copies(config, break_it):
    """The check above has teeth: small mistakes in a copy of the file are rejected."""
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(broken)


# --- structural promises ----------------------------------------------------------------------


def test_aws_provider(config):
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]


def test_head_runs_no_tasks(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def test_exactly_one_gpu_worker_type(config):
    gpu_types = {n: t for n, t in _worker_types(config).items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) == 1, f"expected one GPU worker type, got {sorted(gpu_types)}"
    (gpu,) = gpu_types.values()
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] > 0


def test_cpu_worker_type_without_gpus(config):
    cpu_types = {
        n: t
        for n, t in _worker_types(config).items()
        if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0
    }
    assert cpu_types, "expected a worker type with CPUs and no GPUs"
    for name, t in cpu_types.items():
        assert t["min_workers"] == 0, f"{name} should scale from zero"
        assert t["max_workers"] > 0, f"{name} can never start"


def test_global_max_workers_covers_every_type(config):
    assert config["max_workers"] >= sum(t["max_workers"] for t in _worker_types(config).values())


def test_autoscaling_housekeeping(config):
    assert config["idle_timeout_minutes"] > 0
    assert set(config["file_mounts"]) == {"~/.ray/auth_token", "~/xray-lung-prep-requirements.txt"}  # no code, no data


def test_setup_installs_decoders(config):
    installed = _setup_packages(config)
    for package in REQUIRED_SETUP_PACKAGES:
        assert package in installed, f"setup_commands do not install {package}"


def test_setup_installs_every_project_dependency(config):
    """cluster.yaml's pip line keeps step with pyproject.toml (jobs ship without installing)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    wanted = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
    missing = wanted - _setup_packages(config)
    assert missing == set(), f"pyproject.toml dependencies missing from setup_commands: {missing}"


def test_ray_version_pinned_consistently(config):
    """The pip pin and every docker image tag name the same Ray version."""
    pins = set(re.findall(r"ray\[[^\]]*\]==([0-9.]+)", " ".join(_pip_specs(config, config["setup_commands"]))))
    assert len(pins) == 1, f"expected one pinned Ray version in setup_commands, got {pins}"
    images = [config["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t
    ]
    for image in images:
        tag = image.rsplit(":", 1)[-1]
        assert tag.split("-")[0] in pins, f"{image} does not match ray=={pins}"


def test_every_node_installs_pinned_dependencies_and_its_own_torch(config):
    """Pinned versions (the tests ran with them), the CPU torch on the head and CPU workers, CUDA only on GPU workers."""
    commands = {"head": config["setup_commands"]}
    commands.update({name: t["worker_setup_commands"] for name, t in _worker_types(config).items()})
    for node, cmds in commands.items():
        specs = _pip_specs(config, cmds)
        unpinned = [s for s in specs if "==" not in s]
        assert not unpinned, f"{node} installs unpinned {unpinned}"
        torch = [c for c in cmds if "torch==" in c]
        assert len(torch) == 1 and "torch==2.13.0" in torch[0], node  # the Makefile's test pin
        gpu = config["available_node_types"].get(node, {}).get("resources", {}).get("GPU", 0)
        assert ("download.pytorch.org/whl/cpu" in torch[0]) == (not gpu), f"{node} gets the wrong torch build"
        assert {_name(s) for s in specs} >= _setup_packages(config) - {"torch"}, node


def test_the_docker_recipe_bakes_the_same_pins(config):
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert "docker/requirements.txt" in dockerfile and "torch==2.13.0" in dockerfile
    assert "rayproject/ray:2.60.0-py311-${VARIANT}" in dockerfile
    assert config["file_mounts"]["~/xray-lung-prep-requirements.txt"] == "docker/requirements.txt"
