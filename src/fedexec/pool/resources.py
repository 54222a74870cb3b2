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
    accelerators: tuple[str, ...]   # ids of the GPUs this process may use (find_accelerators)

    @property
    def gpus(self) -> int:
        return len(self.accelerators)

    @classmethod
    def detect(cls) -> "NodeResources":
        import psutil

        return cls(cores=usable_cores(), memory=int(psutil.virtual_memory().available),
                   accelerators=tuple(find_accelerators()))


DETECT_TIMEOUT = 10   # seconds nvidia-smi or rocm-smi may take


def find_accelerators() -> list[str]:
    """The ids of this node's accelerators, for tasks asking for GPUs: the
    devices the scheduler or user made visible (CUDA_VISIBLE_DEVICES,
    ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES; a list set to empty or -1
    means none), else Slurm's SLURM_GPUS_ON_NODE, else those ``nvidia-smi
    -L`` lists, else those ``rocm-smi --showid`` lists, else the NVIDIA
    devices in /dev; none found: []. (The endpoint's
    ``available_accelerators`` setting, when set, is used instead.)"""
    for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is not None:
            return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]
    value = os.environ.get("SLURM_GPUS_ON_NODE")
    if value and value.isdigit():
        return [str(i) for i in range(int(value))]
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
    try:
        return sorted((name[6:] for name in os.listdir("/dev") if name.startswith("nvidia") and name[6:].isdigit()),
                      key=int)
    except OSError:
        return []
