"""What a node offers a pool: cores, memory and GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import usable_cores


@dataclass(frozen=True)
class NodeResources:
    cores: int      # cores this process may run on (its affinity, or the batch job's allocation)
    memory: int     # bytes of memory available now
    gpus: int       # GPUs this process may use

    @classmethod
    def detect(cls) -> "NodeResources":
        import psutil

        return cls(cores=usable_cores(), memory=int(psutil.virtual_memory().available), gpus=_visible_gpus())


def _visible_gpus() -> int:
    """GPUs the scheduler or the user made visible: CUDA_VISIBLE_DEVICES,
    ROCR_VISIBLE_DEVICES or Slurm's SLURM_GPUS_ON_NODE; else the NVIDIA
    devices present. A list set to empty or -1 means none."""
    for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is not None:
            devices = [d for d in value.split(",") if d.strip() and d.strip() != "-1"]
            return len(devices)
    value = os.environ.get("SLURM_GPUS_ON_NODE")
    if value and value.isdigit():
        return int(value)
    try:
        return sum(1 for name in os.listdir("/dev") if name.startswith("nvidia") and name[6:].isdigit())
    except OSError:
        return 0
