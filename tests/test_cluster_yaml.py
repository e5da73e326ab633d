"""cluster.yaml: valid for Ray's own cluster launcher, true to the instance facts of app/hardware.py, and shaped
for this project's GPU presets (pinned GPU types, memory, the staging disk they checkpoint to)."""

import importlib.resources
import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.util.accelerators.accelerators as ray_accelerators
import yaml

from app.config import load_config
from app.hardware import INSTANCE_TYPES, LOCAL_NVME_MOUNT, instance_for

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


@pytest.mark.parametrize("path", GPU_PRESETS, ids=[path.name for path in GPU_PRESETS])
def test_every_gpu_preset_pins_its_nodes_gpu_and_states_its_memory(path):
    """Without scaling.accelerator_type the autoscaler may pick any node with enough GPUs (the 8x A100 40GB
    node for 8 bundles of {8 CPU, 1 GPU} meant for the H100s); the memory is what nvidia-smi reports there."""
    node = GPU_TYPES[HARDWARE_LINE.search(path.read_text())["node_type"]]
    facts = INSTANCE_TYPES[node["node_config"]["InstanceType"]]
    scaling = load_config(path).scaling
    assert scaling.accelerator_type == facts.gpu.ray_type, f"{path.name}: set scaling.accelerator_type"
    assert f"accelerator_type:{scaling.accelerator_type}" in node["resources"]
    assert facts.gpu.memory_gib - 0.1 <= scaling.accelerator_memory_gb <= facts.gpu.memory_gib, (
        f"{path.name}: scaling.accelerator_memory_gb should be the {facts.gpu.memory_gib:.2f} GiB of one "
        f"{facts.gpu.nvidia_smi_name} ({facts.gpu.memory_mib} MiB)")
    assert instance_for(scaling.accelerator_type, scaling.num_workers, scaling.gpus_per_worker) == facts, (
        "the checkpoint planner times the preset on another node type than its header names")


@pytest.mark.parametrize("path", GPU_PRESETS, ids=[path.name for path in GPU_PRESETS])
def test_every_gpu_preset_stages_checkpoints_on_the_disk_gpu_nodes_mount(path):
    staging = load_config(path).run.staging_dir
    assert staging is not None and (staging == LOCAL_NVME_MOUNT or staging.startswith(LOCAL_NVME_MOUNT + "/")), (
        f"{path.name}: set run.staging_dir to {LOCAL_NVME_MOUNT} (the instance NVMe cluster.yaml mounts)")


def test_the_instance_facts_are_those_of_cluster_yamls_node_types():
    used = {spec["node_config"]["InstanceType"] for spec in NODE_TYPES.values()}
    assert used == set(INSTANCE_TYPES), "app/hardware.py records exactly the instance types cluster.yaml uses"
    for name, spec in NODE_TYPES.items():
        facts, resources = INSTANCE_TYPES[spec["node_config"]["InstanceType"]], spec["resources"]
        assert resources.get("GPU", 0) == facts.gpus, name
        if facts.gpu is None:
            continue
        assert resources["CPU"] == facts.vcpus, name
        assert [key for key in resources if key.startswith("accelerator_type:")] == [
            f"accelerator_type:{facts.gpu.ray_type}"], name


def test_the_gpu_types_are_rays_accelerator_types():
    known = {value for key, value in vars(ray_accelerators).items() if key.startswith("NVIDIA_")}
    assert {facts.gpu.ray_type for facts in INSTANCE_TYPES.values() if facts.gpu} <= known


def test_gpu_nodes_mount_their_instance_nvme_into_the_container():
    bind = f"-v {LOCAL_NVME_MOUNT}:{LOCAL_NVME_MOUNT}"
    assert bind in CLUSTER["docker"]["worker_run_options"], "GPU workers' containers must see the staging disk"
    for name, spec in GPU_TYPES.items():
        assert INSTANCE_TYPES[spec["node_config"]["InstanceType"]].nvme_devices > 0, name
        commands = "\n".join(spec.get("initialization_commands", []))
        assert f"MOUNT={LOCAL_NVME_MOUNT};" in commands, f"{name}: initialization_commands must mount the NVMe"
    assert "initialization_commands" not in HEAD and "initialization_commands" not in CLUSTER


EBS = "/dev/nvme0n1 Amazon Elastic Block Store\n"
NVME = [f"/dev/nvme{index}n1" for index in range(1, 9)]


def _mount_command(tmp_path, disks: str, mounts: str = "", types: str = "", mounted: bool = False) -> list[str]:
    """Run a GPU node's initialization command with stand-ins for the commands that touch the host: `sudo` logs
    its command (and says no filesystem exists yet), lsblk and mountpoint answer as the host would."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "sudo.log"
    scripts = {
        "sudo": f'echo "$*" >> {log}; [ "$1" != blkid ]',
        "mountpoint": f"exit {0 if mounted else 1}",
        "lsblk": 'case "$1" in -dpno) printf "%b" "$DISKS";; -rno) printf "%b" "$MOUNTS";; '
                 '-rpno) printf "%b" "$TYPES";; esac',
        "mdadm": "exit 0",
    }
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    command = GPU_TYPES["gpu-8x-h100"]["initialization_commands"][0]
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "DISKS": disks, "MOUNTS": mounts, "TYPES": types}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    return log.read_text().splitlines() if log.exists() else []


def test_the_mount_raids_several_nvme_devices(tmp_path):
    disks = EBS + "".join(f"{device} Amazon EC2 NVMe Instance Storage\n" for device in NVME)
    calls = _mount_command(tmp_path, disks, types="".join(f"{device} disk\n" for device in NVME))
    assert f"mdadm --create /dev/md0 --run --level=0 --raid-devices=8 {' '.join(NVME)}" in calls
    assert any(call.startswith("mkfs.ext4") and call.endswith("/dev/md0") for call in calls)
    assert calls[-2:] == [f"mount -o noatime /dev/md0 {LOCAL_NVME_MOUNT}", f"chmod 1777 {LOCAL_NVME_MOUNT}"]


def test_the_mount_formats_a_single_device_without_raid(tmp_path):
    calls = _mount_command(tmp_path, EBS + "/dev/nvme1n1 Amazon EC2 NVMe Instance Storage\n",
                           types="/dev/nvme1n1 disk\n")
    assert not any("mdadm" in call for call in calls)
    assert f"mount -o noatime /dev/nvme1n1 {LOCAL_NVME_MOUNT}" in calls


def test_the_mount_reuses_a_disk_the_ami_mounted(tmp_path):
    calls = _mount_command(tmp_path, EBS + "/dev/nvme1n1 Amazon EC2 NVMe Instance Storage\n",
                           mounts="/opt/dlami/nvme\n", types="/dev/nvme1n1 disk\n/dev/md127 raid0\n")
    assert f"mount --bind /opt/dlami/nvme {LOCAL_NVME_MOUNT}" in calls
    assert not any(call.startswith(("mkfs", "mdadm")) for call in calls)


def test_a_node_without_instance_nvme_gets_a_plain_folder(tmp_path):
    calls = _mount_command(tmp_path, EBS)
    assert calls == [f"mkdir -p {LOCAL_NVME_MOUNT}", f"chmod 1777 {LOCAL_NVME_MOUNT}"]


def test_the_mount_is_idempotent(tmp_path):
    disks = EBS + "/dev/nvme1n1 Amazon EC2 NVMe Instance Storage\n"
    assert _mount_command(tmp_path, disks, mounted=True) == []


def test_there_are_gpu_presets_to_check():
    assert len(GPU_PRESETS) >= 6
