"""cluster.yaml: valid for Ray's own cluster launcher, and shaped for this project's GPU presets."""

import importlib.resources
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from app.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
NODE_TYPES = CLUSTER["available_node_types"]
HEAD = NODE_TYPES[CLUSTER["head_node_type"]]
GPU_TYPES = {name: spec for name, spec in NODE_TYPES.items() if spec["resources"].get("GPU", 0) > 0}
GPU_INSTANCE = re.compile(r"^(g\d|p\d)")  # AWS GPU instance families (g5, p4d, p5, ...)
# "# Hardware: 8x NVIDIA A100 40GB, one AWS p4d.24xlarge (cluster.yaml node type gpu-8x-a100)."
HARDWARE_LINE = re.compile(r"^# Hardware: \d+x NVIDIA (?P<gpu>\S+) \d+GB, .*node type (?P<node_type>[\w.-]+)\)",
                           re.MULTILINE)
GPU_PRESETS = [path for path in sorted((ROOT / "configs").glob("*.yaml")) if HARDWARE_LINE.search(path.read_text())]


def _commands(key: str) -> str:
    return "\n".join(CLUSTER.get(key, []))


def test_validates_against_the_schema_ray_up_uses():
    # The same file `ray up` checks a config against (ray/autoscaler/ray-schema.json, shipped in the wheel).
    schema = json.loads(importlib.resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(CLUSTER), key=lambda error: list(error.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, error.path)) or '(top)'}: {error.message}" for error in errors)


def test_the_schema_check_catches_a_wrong_key():
    schema = json.loads(importlib.resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    broken = {**CLUSTER, "available_node_types": {**NODE_TYPES, "bad": {"node_config": {}, "resources": {"GPU": 0.5}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_the_rules_ray_checks_beyond_the_schema():
    # ray up also refuses these (autoscaler validate_config), before any cloud call.
    assert CLUSTER["head_node_type"] in NODE_TYPES
    assert sum(spec.get("min_workers", 0) for spec in NODE_TYPES.values()) <= CLUSTER["max_workers"]
    for name, spec in NODE_TYPES.items():
        assert spec.get("min_workers", 0) <= spec.get("max_workers", CLUSTER["max_workers"]), name
        assert spec.get("max_workers", 0) <= CLUSTER["max_workers"], f"{name} can never reach its max_workers"


def test_the_head_is_a_cpu_node_that_takes_no_training_work():
    assert not GPU_INSTANCE.match(HEAD["node_config"]["InstanceType"])
    assert HEAD["resources"].get("GPU", 0) == 0
    assert HEAD["resources"].get("CPU") == 0, "training workers and data tasks belong on the worker nodes"
    assert CLUSTER["docker"]["head_image"].endswith("-cpu")


def test_gpu_worker_types_scale_from_zero_on_demand():
    assert GPU_TYPES, "cluster.yaml needs at least one GPU worker type"
    for name, spec in GPU_TYPES.items():
        assert GPU_INSTANCE.match(spec["node_config"]["InstanceType"]), name
        assert spec.get("min_workers", 0) == 0, f"{name}: an idle GPU node costs money; let jobs start it"
        assert spec["max_workers"] > spec.get("min_workers", 0), f"{name} cannot autoscale"
        assert any(key.startswith("accelerator_type:") for key in spec["resources"]), name
    assert CLUSTER["docker"]["image"].endswith("-gpu")


def test_images_run_the_ray_this_project_pins():
    images = {CLUSTER["docker"]["image"], CLUSTER["docker"]["head_image"]}
    assert all(image.startswith(f"rayproject/ray:{ray.__version__}-py3") for image in images), images


def test_file_mounts_bring_the_project_and_setup_installs_it():
    project = [remote for remote, local in CLUSTER["file_mounts"].items() if (ROOT / local).resolve() == ROOT]
    assert project, "file_mounts must copy the repository root (the folder holding pyproject.toml)"
    setup = _commands("setup_commands")  # common commands: every node type gets the project
    assert any("pip install" in line and f"-e {remote}" in line for line in CLUSTER["setup_commands"]
               for remote in project), setup
    # What .gitignore lists (the local CPU .venv, runs/) stays behind.
    assert ".gitignore" in CLUSTER["rsync_filter"]
    assert {".venv/", "runs/"} <= set((ROOT / ".gitignore").read_text().split())


def test_gpu_nodes_get_cuda_torch_and_the_head_the_cpu_build():
    torch_pin = re.search(r'"torch==([\d.]+)"', (ROOT / "Makefile").read_text())[1]
    install_torch = next(line for line in CLUSTER["setup_commands"] if "torch==" in line)
    gpu_branch, cpu_branch = install_torch.split("else", 1)
    assert "nvidia-smi" in gpu_branch and f"torch=={torch_pin}" in gpu_branch
    assert "download.pytorch.org/whl/cpu" not in gpu_branch, "GPU nodes need PyPI's CUDA build of torch"
    assert f"torch=={torch_pin}" in cpu_branch and "download.pytorch.org/whl/cpu" in cpu_branch
    assert install_torch in CLUSTER["setup_commands"][: CLUSTER["setup_commands"].index(
        next(line for line in CLUSTER["setup_commands"] if "-e " in line))], "torch before the project"


def _environment(command: str) -> dict[str, str]:
    words = shlex.split(command.replace(";", " ; "))
    return dict(word.split("=", 1) for word in words if re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", word))


def test_every_node_starts_ray_with_the_same_environment():
    head, worker = _commands("head_start_ray_commands"), _commands("worker_start_ray_commands")
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert _environment(head) == _environment(worker)
    assert _environment(head)["RAY_AUTH_MODE"] == "token"
    assert "~/.ray/auth_token" in CLUSTER["file_mounts"], "token auth needs the same token on every node"


@pytest.mark.parametrize("path", GPU_PRESETS, ids=[path.name for path in GPU_PRESETS])
def test_every_gpu_preset_fits_the_node_type_it_names(path):
    hardware = HARDWARE_LINE.search(path.read_text())
    assert hardware["node_type"] in GPU_TYPES, f"{path.name} names node type {hardware['node_type']}, not in cluster.yaml"
    node = GPU_TYPES[hardware["node_type"]]
    assert f"accelerator_type:{hardware['gpu']}" in node["resources"], f"{path.name}: {hardware['gpu']} GPUs"
    scaling = load_config(path).scaling
    gpus_per_node = node["resources"]["GPU"]
    workers_per_node = min(scaling.num_workers, int(gpus_per_node // scaling.gpus_per_worker))
    assert math.ceil(scaling.num_workers / workers_per_node) <= node["max_workers"]
    assert workers_per_node * scaling.cpus_per_worker <= node["resources"]["CPU"]


def test_there_are_gpu_presets_to_check():
    assert len(GPU_PRESETS) >= 6
