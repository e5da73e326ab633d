"""Facts of the GPUs and AWS instance types that cluster.yaml uses: the one place the project records them.

The presets' `scaling.accelerator_type` and `scaling.accelerator_memory_gb`, cluster.yaml's node resources and
the checkpoint planner (app/checkpoint_plan.py) read them from here; tests/test_cluster_yaml.py checks cluster.yaml
and every GPU preset against them.

Published facts (vCPUs, host memory, GPUs, instance-store NVMe, network) are from AWS's instance-type pages
(EC2 "Accelerated computing" / "General purpose" specifications). GPU memory is the total nvidia-smi reports
on those instances (less than the marketing "24GB" / "80GB": ECC and the driver's reservation), which is what
the planner may fill. Peak bf16 throughput is dense (no 2:4 sparsity) tensor-core math: NVIDIA's A100 and
H100 SXM datasheets; the A10G has no NVIDIA datasheet, and 70 TFLOPS is the figure AWS-focused references
give (e.g. Baseten, "NVIDIA A10 vs A10G for ML model inference"), below the A10's 125.

ASSUMED, not measured: the sustained write rate of a node's instance NVMe (RAID0 over its devices), the S3
upload rate of one worker and of a node, and the device-to-host rate of a ZeRO-3 gather. They size the
checkpoint estimates only; measure them on a node (fio / `dd oflag=direct` to LOCAL_NVME_MOUNT, an upload
with Ray Train) and update these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9  # disk and network rates and checkpoint sizes are in decimal GB, as AWS quotes them
MIB = 2**20

LOCAL_NVME_MOUNT = "/mnt/local_nvme"  # where cluster.yaml mounts a GPU node's instance NVMe (host and container)
# The root volume cluster.yaml gives every node: gp3 at its baseline throughput (125 MiB/s unless provisioned).
ROOT_VOLUME_WRITE_BYTES_S = 125 * MIB
# ASSUMED: one Ray Train worker's upload to S3. Ray 2.60 uploads a worker's checkpoint folder one file at a time
# (pyarrow copy_files with use_threads=False for S3); pyarrow's multipart writer sends parts in the background.
S3_WORKER_UPLOAD_BYTES_S = 0.25 * GB
# ASSUMED: one process serialising a state dict to a local file (torch.save / safetensors), whatever the disk.
LOCAL_WRITER_BYTES_S = 2.0 * GB
# ASSUMED: rank 0's host copy of parameters gathered one at a time from ZeRO-3 shards (PCIe device-to-host,
# unpinned, with a per-parameter all-gather).
GATHER_BYTES_S = 5.0 * GB


@dataclass(frozen=True)
class GPU:
    """One GPU model as Ray and nvidia-smi name it."""

    ray_type: str  # Ray's accelerator type (ray.util.accelerators), cluster.yaml's accelerator_type:<it> resource
    nvidia_smi_name: str
    memory_mib: int  # total memory as nvidia-smi reports it on the instance
    peak_bf16_tflops: float  # dense tensor-core peak

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


A10G = GPU("A10G", "NVIDIA A10G", 23_028, 70.0)
A100_40GB = GPU("A100", "NVIDIA A100-SXM4-40GB", 40_960, 312.0)
H100_80GB = GPU("H100", "NVIDIA H100 80GB HBM3", 81_559, 989.0)


@dataclass(frozen=True)
class InstanceType:
    """An EC2 instance type: published facts, then the ASSUMED rates the checkpoint planner uses."""

    name: str
    vcpus: int
    memory_gib: int
    gpu: GPU | None
    gpus: int
    nvme_devices: int  # instance-store NVMe SSDs
    nvme_device_gb: int
    network_gbps: float  # "up to" for the smaller sizes
    nvme_write_gb_s: float  # ASSUMED: sustained write of all its NVMe together (RAID0), GB/s
    s3_upload_gb_s: float  # ASSUMED: upload to S3 of all its workers together, GB/s

    @property
    def nvme_gb(self) -> int:
        return self.nvme_devices * self.nvme_device_gb


INSTANCE_TYPES: dict[str, InstanceType] = {
    instance.name: instance for instance in (
        InstanceType("m5.2xlarge", 8, 32, None, 0, 0, 0, 10, 0.0, 0.5),
        # NVMe write: 0.5 GB/s per small g5 device, 1 GB/s for the 3.8 TB one; S3 well under the network's rate.
        InstanceType("g5.2xlarge", 8, 32, A10G, 1, 1, 450, 10, 0.5, 0.5),
        InstanceType("g5.12xlarge", 48, 192, A10G, 4, 1, 3800, 40, 1.0, 1.0),
        # p4d / p5: 8 devices at ~1 / ~2 GB/s each in RAID0; S3 capped at 2 GB/s per node (pyarrow, not AWS CRT).
        InstanceType("p4d.24xlarge", 96, 1152, A100_40GB, 8, 8, 1000, 400, 8.0, 2.0),
        InstanceType("p5.48xlarge", 192, 2048, H100_80GB, 8, 8, 3840, 3200, 16.0, 2.0),
    )
}


def gpu_for(accelerator_type: str) -> GPU:
    """The GPU of a Ray accelerator type that cluster.yaml's nodes carry.

    Raises:
        ValueError: no instance type here has that GPU.
    """
    for instance in INSTANCE_TYPES.values():
        if instance.gpu is not None and instance.gpu.ray_type == accelerator_type:
            return instance.gpu
    known = sorted({i.gpu.ray_type for i in INSTANCE_TYPES.values() if i.gpu is not None})
    raise ValueError(f"scaling.accelerator_type={accelerator_type!r} is not a GPU of cluster.yaml's nodes; "
                     f"use one of {known} (app/hardware.py)")


def instance_for(accelerator_type: str, workers: int, gpus_per_worker: float = 1.0) -> InstanceType:
    """The node a job of `workers` GPU workers of `accelerator_type` is planned on: the smallest instance type
    with that GPU that holds all the workers, else the largest one (the job then spans several nodes)."""
    gpu = gpu_for(accelerator_type)
    candidates = sorted((i for i in INSTANCE_TYPES.values() if i.gpu == gpu), key=lambda i: i.gpus)
    return next((i for i in candidates if i.gpus >= workers * gpus_per_worker), candidates[-1])
