"""What a node offers a pool: cores, memory and GPUs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


DETECT_TIMEOUT = 10   # seconds nvidia-smi or rocm-smi may take


def find_accelerators() -> list[str]:
    """The ids of this node's accelerators, for tasks asking for GPUs: the
    devices the scheduler or user made visible (CUDA_VISIBLE_DEVICES,
    ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES), else those ``nvidia-smi -L``
    lists, else those ``rocm-smi --showid`` lists; none found: []. (The
    endpoint's ``available_accelerators`` setting, when set, is used instead.)"""
    for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is not None:
            return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]
    for command, pattern in ((["nvidia-smi", "-L"], r"^GPU (\d+):"), (["rocm-smi", "--showid"], r"^GPU\[(\d+)\]")):
        if shutil.which(command[0]) is None:
            continue
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=DETECT_TIMEOUT,
                                 stdin=subprocess.DEVNULL).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        ids = sorted({m.group(1) for m in re.finditer(pattern, out, re.MULTILINE)}, key=int)
        if ids:
            return ids
    return []
