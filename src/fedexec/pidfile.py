"""A JSON pid file that knows whether its process is still the one alive.

A pid alone can be reused after a crash; recording the process start time
beside it lets ``status`` and ``stop`` tell our daemon from a stranger.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class PidFile:
    """``path`` holds ``{"pid", "started", ...}`` for a running daemon."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, **info: Any) -> None:
        pid = os.getpid()
        record = {"pid": pid, "started": _start_time(pid), **info}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # private, whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any] | None:
        """The record if its process is alive (and is the same process)."""
        try:
            record = json.loads(self.path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        started = _start_time(pid)
        if started is None or (record.get("started") and abs(started - record["started"]) > 1.0):
            return None
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return None
        return record

    def remove(self) -> None:
        """Delete the file if it is this process's own."""
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
