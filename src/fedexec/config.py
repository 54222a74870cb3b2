"""Where fedexec keeps its files, and the endpoint configuration format.

Everything lives under the fedexec home: ``$FEDEXEC_HOME``, by default
``~/.fedexec``. An endpoint named NAME keeps ``endpoints/NAME/config.toml``
(written by ``fedexec endpoint configure``), its pid file and its log there.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RELAY_PORT = 55700
DEFAULT_WORKER_BATCH = 64
DEFAULT_RELAY_ADDRESS = f"tcp://127.0.0.1:{DEFAULT_RELAY_PORT}"
SANDBOXES = ("none", "bwrap", "apptainer", "podman")
ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message says which."""


def fedexec_home() -> Path:
    return Path(os.environ.get("FEDEXEC_HOME") or Path.home() / ".fedexec")


def relay_dir() -> Path:
    return fedexec_home() / "relay"


def endpoint_dir(name: str) -> Path:
    check_endpoint_name(name)
    return fedexec_home() / "endpoints" / name


def check_endpoint_name(name: str) -> None:
    if not ENDPOINT_NAME.match(name):
        raise ConfigError(
            f"invalid endpoint name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware), at least 1."""
    import psutil

    try:
        return max(1, len(psutil.Process().cpu_affinity()))
    except (AttributeError, OSError):
        return max(1, psutil.cpu_count() or 1)


@dataclass
class EndpointConfig:
    """What an endpoint needs to run: who it is, where its relay is, its pool."""

    name: str
    endpoint_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    relay: str = DEFAULT_RELAY_ADDRESS
    max_workers: int = 0            # 0: usable cores
    prefetch: int = 1               # tasks queued per worker beyond the running one
    heartbeat_period: float = 2.0   # seconds between heartbeats to the relay
    heartbeats_missed: int = 3      # the relay marks it disconnected after this many silent periods (+ 1 s)
    worker_batch: int = DEFAULT_WORKER_BATCH  # most fast tasks handed a worker at once (1: one at a time)
    worker_lost_retries: int = 2    # times a task whose worker died is run again before it fails
    allowed_functions: list[str] = field(default_factory=list)  # hex function hashes; empty: any function
    sandbox: str = "none"           # none | bwrap | apptainer | podman: what workers run inside
    sandbox_image: str = ""         # the image (apptainer, podman) the workers run in
    relay_public_key: str = ""      # the relay's CURVE public key (Z85), pinned; empty: plain connection

    def workers(self) -> int:
        return self.max_workers or usable_cores()

    def validate(self) -> None:
        check_endpoint_name(self.name)
        for key, kind in (("endpoint_id", str), ("relay", str), ("max_workers", int), ("prefetch", int),
                          ("heartbeat_period", (int, float)), ("worker_batch", int),
                          ("worker_lost_retries", int), ("heartbeats_missed", int),
                          ("allowed_functions", list), ("sandbox", str), ("sandbox_image", str),
                          ("relay_public_key", str)):
            value = getattr(self, key)
            if not isinstance(value, kind) or isinstance(value, bool):
                want = kind.__name__ if isinstance(kind, type) else "number"
                article = "an" if want[0] in "aeiou" else "a"
                raise ConfigError(f"{key} must be {article} {want}, not {value!r}")
        try:
            uuid.UUID(self.endpoint_id)
        except ValueError:
            raise ConfigError(f"endpoint_id {self.endpoint_id!r} is not a UUID") from None
        if not self.relay.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"relay {self.relay!r} must be a tcp:// or ipc:// address")
        if self.max_workers < 0:
            raise ConfigError(f"max_workers must be >= 0 (0 means usable cores), not {self.max_workers}")
        if self.prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0, not {self.prefetch}")
        if self.worker_batch < 1:
            raise ConfigError(f"worker_batch must be >= 1, not {self.worker_batch}")
        if self.heartbeat_period <= 0:
            raise ConfigError(f"heartbeat_period must be > 0, not {self.heartbeat_period}")
        if not 1 <= self.heartbeats_missed <= 100:
            raise ConfigError(f"heartbeats_missed must be from 1 to 100, not {self.heartbeats_missed}")
        if self.worker_lost_retries < 0:
            raise ConfigError(f"worker_lost_retries must be >= 0, not {self.worker_lost_retries}")
        for fn_hash in self.allowed_functions:
            if not (isinstance(fn_hash, str) and re.fullmatch(r"[0-9a-f]{64}", fn_hash)):
                raise ConfigError(f"allowed_functions: {fn_hash!r} is not a function hash (64 hex digits, "
                                  "as printed by 'fedexec function hash')")
        if self.sandbox not in SANDBOXES:
            raise ConfigError(f"sandbox must be one of {', '.join(SANDBOXES)}, not {self.sandbox!r}")
        if self.sandbox in ("apptainer", "podman") and not self.sandbox_image:
            raise ConfigError(f"sandbox {self.sandbox!r} needs sandbox_image (the image its workers run in)")
        if self.relay_public_key and len(self.relay_public_key) != 40:
            raise ConfigError(f"relay_public_key must be the relay's 40-character Z85 public key, "
                              f"not {self.relay_public_key!r}")

    @property
    def path(self) -> Path:
        return endpoint_dir(self.name) / "config.toml"

    def save(self) -> Path:
        self.validate()
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            f"# fedexec endpoint {self.name!r}; edit and restart the endpoint to apply.\n"
            f'endpoint_id = "{self.endpoint_id}"\n'
            f"# The relay this endpoint connects out to.\n"
            f'relay = "{self.relay}"\n'
            f"# Worker processes in the local pool; 0 = usable cores.\n"
            f"max_workers = {self.max_workers}\n"
            f"# Extra tasks fetched per worker so workers never wait on the network.\n"
            f"prefetch = {self.prefetch}\n"
            f"# Seconds between heartbeats; the relay marks the endpoint disconnected\n"
            f"# (and queues its tasks for its return) after heartbeats_missed silent periods + 1 s.\n"
            f"heartbeat_period = {self.heartbeat_period}\n"
            f"heartbeats_missed = {self.heartbeats_missed}\n"
            f"# Most fast tasks (under 0.5 ms) handed a worker at once; 1 turns batching off.\n"
            f"worker_batch = {self.worker_batch}\n"
            f"# Times a task is run again when its worker dies under it (not counted\n"
            f"# against the task's own max_retries) before it fails with WorkerLost.\n"
            f"worker_lost_retries = {self.worker_lost_retries}\n"
            f"# Function hashes this endpoint runs ('fedexec function hash'); empty: any.\n"
            f"allowed_functions = {json.dumps(self.allowed_functions)}\n"
            f"# Where workers run: none, bwrap (read-only host, a private directory\n"
            f"# per task), apptainer or podman (with sandbox_image).\n"
            f'sandbox = "{self.sandbox}"\n'
            f'sandbox_image = "{self.sandbox_image}"\n'
            f"# The relay's CURVE public key (fedexec relay key); set: traffic is encrypted.\n"
            f'relay_public_key = "{self.relay_public_key}"\n'
        )
        path.write_text(text)
        return path

    @classmethod
    def load(cls, name: str) -> "EndpointConfig":
        path = endpoint_dir(name) / "config.toml"
        if not path.exists():
            raise ConfigError(f"endpoint {name!r} is not configured (no {path}); run 'fedexec endpoint configure {name}'")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        known = {"endpoint_id", "relay", "max_workers", "prefetch", "heartbeat_period", "worker_batch",
                 "worker_lost_retries", "heartbeats_missed", "allowed_functions", "sandbox", "sandbox_image",
                 "relay_public_key"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
        try:
            config = cls(name=name, **data)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        config.validate()
        return config
