"""Where fedexec keeps its files, and the endpoint configuration format.

Everything lives under the fedexec home: ``$FEDEXEC_HOME``, by default
``~/.fedexec``. An endpoint named NAME keeps ``endpoints/NAME/config.toml``
(written by ``fedexec endpoint configure``), its pid file and its log there.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FedexecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RELAY_PORT = 55700
# Most fast tasks handed a worker at once. Batches are bounded by work too
# (dispatch.BATCH_WORK, ~1 ms of it), so this cap binds only for tasks under
# ~10 us. Session 30: 64 -> 256, because each hand-off wakes the worker, and
# on 2 cores the woken worker preempts the loop that fed it (perf sched:
# 44 % of the embedded process's switches off the CPU at the return from
# sendmsg, state R). No-op map, 10 alternating pairs: 27.4k -> 30.6k tasks/s.
DEFAULT_WORKER_BATCH = 256
TASK_DIR_TTL = 7 * 24 * 3600.0   # seconds a shell task's directory is kept after its last change (taskdirs.py)
DEFAULT_RELAY_ADDRESS = f"tcp://127.0.0.1:{DEFAULT_RELAY_PORT}"
SANDBOXES = ("none", "bwrap", "apptainer", "podman")
PROVIDERS = ("local", "slurm", "parsl", "manual")
ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(FedexecError, ValueError):
    """A configuration file or value that cannot be used; the message says
    which. A :class:`ValueError` too, as a bad argument is."""


def fedexec_home() -> Path:
    return Path(os.environ.get("FEDEXEC_HOME") or Path.home() / ".fedexec")


def relay_dir() -> Path:
    return fedexec_home() / "relay"


def endpoint_dir(name: str) -> Path:
    check_endpoint_name(name)
    return fedexec_home() / "endpoints" / name


# locks of the configured endpoints this process runs (endpoint_lock): held until it exits
_held_locks: dict[str, int] = {}


def endpoint_lock(name: str, *, hold: bool) -> bool:
    """Whether the configured endpoint ``name`` is free to run in this
    process: an exclusive ``flock`` on ``endpoint.lock`` in its directory,
    taken before anything starts by whatever runs it (``python -m
    fedexec.endpoint --name``, or a relay with ``--endpoint``), so that two
    processes starting it at once never both run it (``endpoint.json`` is
    written only later). ``hold``: keep it until this process exits (the
    kernel lets go of it then, also after a kill -9; the descriptor is not
    inherited by workers); else only try it and let go (a check)."""
    if name in _held_locks:
        return True
    directory = endpoint_dir(name)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / "endpoint.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    if hold:
        _held_locks[name] = fd
    else:
        os.close(fd)
    return True


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


def parse_walltime(value: str) -> float:
    """Seconds in a Slurm-style time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``
    or ``D-HH:MM:SS``."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        raise ConfigError(f"walltime {value!r} is not a time limit (HH:MM:SS, D-HH:MM:SS or minutes)")
    days, a, b, c = match.groups()
    if c is not None:
        hours, minutes, seconds = int(a), int(b), int(c)
    elif b is not None:
        hours, minutes, seconds = (int(a), int(b), 0) if days else (0, int(a), int(b))
    else:
        hours, minutes, seconds = (int(a), 0, 0) if days else (0, int(a), 0)
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ConfigError(f"walltime {value!r} must be longer than zero")
    return float(total)


@dataclass
class ProviderConfig:
    """How an endpoint gets its worker pools, and how many: the ``[provider]``
    table of its config.

    A *block* is one provisioning request (a local process, a batch job) that
    runs one pool per node. The endpoint keeps between ``min_blocks`` and
    ``max_blocks`` of them, starting with ``init_blocks``: more when tasks wait
    beyond its workers, fewer when a block's pools have been idle for
    ``max_idletime`` seconds.
    """

    type: str = "local"             # local | slurm | parsl | manual (pools started by hand: fedexec pool)
    init_blocks: int = 1
    min_blocks: int = 0             # local: 1 unless set
    max_blocks: int = 1
    nodes_per_block: int = 1
    max_idletime: float = 120.0     # seconds a block's pools sit idle before it is let go (above min_blocks)
    walltime: str = ""              # a block's time limit (HH:MM:SS); its pools drain `drain` seconds before
    drain: float = 60.0
    partition: str = ""             # slurm
    account: str = ""               # slurm
    exclusive: bool = True          # slurm: whole nodes (else --cpus-per-task=max_workers)
    in_process: bool | None = None  # local: each pool inside the endpoint's process (no hop to it); unset: when
                                    # allowed (pools_in_process)
    scheduler_options: str = ""     # slurm: extra lines for the batch script ("#SBATCH --gres=gpu:1")
    worker_init: str = ""           # shell commands run before the pools start (module load, source venv)
    address: str = ""               # where pools connect; "": an ipc socket (local), else this host's address
    port: int = 0                   # the pool socket's TCP port; 0: any free port
    python: str = ""                # the Python on the nodes; "": the endpoint's own
    parsl_class: str = ""           # parsl: the provider class, e.g. "parsl.providers.SlurmProvider"
    parsl_options: dict = field(default_factory=dict)   # parsl: keyword arguments for it
    parsl_launcher: str = ""        # parsl: a launcher class, e.g. "parsl.launchers.SrunLauncher"

    NUMBERS = {"init_blocks": int, "min_blocks": int, "max_blocks": int, "nodes_per_block": int,
               "max_idletime": (int, float), "drain": (int, float), "port": int}
    TEXTS = ("type", "walltime", "partition", "account", "scheduler_options", "worker_init", "address",
             "python", "parsl_class", "parsl_launcher")

    @classmethod
    def from_dict(cls, data: dict) -> "ProviderConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"[provider] must be a table, not {data!r}")
        known = set(cls.NUMBERS) | set(cls.TEXTS) | {"parsl_options", "exclusive", "in_process"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"[provider]: unknown setting(s) {', '.join(sorted(unknown))}")
        config = cls(**data)
        if data.get("type", "local") == "local" and "min_blocks" not in data:
            config.min_blocks = 1   # a local endpoint keeps its pool (and its warm workers)
        config.validate()
        return config

    def validate(self) -> None:
        for key, kind in self.NUMBERS.items():
            value = getattr(self, key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"[provider] {key} must be a {'number' if isinstance(kind, tuple) else 'whole number'}, "
                                  f"not {value!r}")
        for key in self.TEXTS:
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"[provider] {key} must be a string, not {getattr(self, key)!r}")
        if not isinstance(self.exclusive, bool):
            raise ConfigError(f"[provider] exclusive must be true or false, not {self.exclusive!r}")
        if not isinstance(self.parsl_options, dict):
            raise ConfigError(f"[provider] parsl_options must be a table, not {self.parsl_options!r}")
        if self.type not in PROVIDERS:
            raise ConfigError(f"[provider] type must be one of {', '.join(PROVIDERS)}, not {self.type!r}")
        if not 0 <= self.min_blocks <= self.max_blocks:
            raise ConfigError(f"[provider] needs 0 <= min_blocks <= max_blocks, not min_blocks={self.min_blocks}, "
                              f"max_blocks={self.max_blocks}")
        if not 0 <= self.init_blocks <= self.max_blocks:
            raise ConfigError(f"[provider] needs 0 <= init_blocks <= max_blocks, not init_blocks={self.init_blocks}, "
                              f"max_blocks={self.max_blocks}")
        if self.nodes_per_block < 1:
            raise ConfigError(f"[provider] nodes_per_block must be >= 1, not {self.nodes_per_block}")
        if self.type == "local" and self.nodes_per_block != 1:
            raise ConfigError("[provider] nodes_per_block must be 1 for the local provider (one machine)")
        if self.max_idletime < 0 or self.drain < 0:
            raise ConfigError("[provider] max_idletime and drain must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"[provider] port {self.port} is not a TCP port")
        if self.walltime:
            seconds = parse_walltime(self.walltime)
            if self.drain >= seconds:
                raise ConfigError(f"[provider] drain ({self.drain:g} s) must be shorter than the walltime "
                                  f"({self.walltime} = {seconds:g} s)")
        if self.in_process is not None and not isinstance(self.in_process, bool):
            raise ConfigError(f"[provider] in_process must be true or false, not {self.in_process!r}")
        if self.in_process and not self.in_process_allowed:
            raise ConfigError("[provider] in_process runs pools in the endpoint's own process and Python: only with "
                              "type 'local' and no address, worker_init or python")
        if self.type == "parsl" and not self.parsl_class:
            raise ConfigError("[provider] type 'parsl' needs parsl_class, e.g. \"parsl.providers.SlurmProvider\"")

    @property
    def in_process_allowed(self) -> bool:
        """Whether pools can run in the endpoint's own process: local ones,
        started with its own Python and environment (no ``worker_init`` or
        ``python``), that no other node has to reach (no ``address``)."""
        return self.type == "local" and not (self.address or self.worker_init or self.python)

    @property
    def pools_in_process(self) -> bool:
        """Whether this endpoint runs its pools in its own process: as set,
        else whenever allowed (a task then crosses no pool process; a pool
        process of their own is ``in_process = false``)."""
        return self.in_process_allowed if self.in_process is None else self.in_process

    def walltime_seconds(self) -> float | None:
        return parse_walltime(self.walltime) if self.walltime else None

    def to_toml(self) -> str:
        lines = ["[provider]",
                 "# How pools are started: local (processes here), slurm (sbatch), parsl (any",
                 "# Parsl execution provider) or manual ('python -m fedexec.pool' run by hand on each node)."]
        defaults = ProviderConfig(type=self.type)
        if self.type == "local":
            defaults.min_blocks = 1
        for key in ("type", "init_blocks", "min_blocks", "max_blocks", "nodes_per_block", "max_idletime",
                    "walltime", "drain", "partition", "account", "exclusive", "in_process", "scheduler_options",
                    "worker_init", "address", "port", "python", "parsl_class", "parsl_launcher"):
            value = getattr(self, key)
            if key != "type" and value == getattr(defaults, key) and key not in ("init_blocks", "min_blocks",
                                                                               "max_blocks", "max_idletime"):
                continue
            lines.append(f"{key} = {toml_value(value)}")
        if self.parsl_options:
            lines.append("[provider.parsl_options]")
            lines.extend(f"{toml_key(key)} = {toml_value(value)}" for key, value in self.parsl_options.items())
        return "\n".join(lines) + "\n"


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value: object) -> str:
    """A TOML value for what a config holds: strings, numbers, booleans, and
    lists and tables of them (JSON's string escapes are TOML's too)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, (bool, int, float, str)):
        return json.dumps(value)
    raise ConfigError(f"cannot write {value!r} to a config file")


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
    # arguments and results in the data-only format only (serialize.py), never
    # pickles; None: on when allowed_functions is set (see takes_data_only)
    data_only: bool | None = None
    relay_public_key: str = ""      # the relay's CURVE public key (Z85), pinned; empty: plain connection
    ref_cache_bytes: int = 16 * 1024 ** 3   # bytes of DataRef copies kept at most (endpoint/refs.py)
    # the accelerators (GPU ids) of each node, as in Parsl; empty: found on the node (nvidia-smi -L,
    # rocm-smi, CUDA_VISIBLE_DEVICES); a task asking for GPUs gets its own (CUDA_VISIBLE_DEVICES ...)
    available_accelerators: list[str] = field(default_factory=list)
    accelerators_shared: bool = False   # true: concurrent tasks may be given the same accelerator
    # how a task asking for several nodes or MPI ranks is launched: srun, mpiexec, mpirun or a
    # command (e.g. "mpiexec.mpich"); "": srun with the slurm provider, else mpiexec
    mpi_launcher: str = ""
    # seconds a shell task's directory (its whole output) is kept after its last change; 0: for ever
    task_dir_ttl: float = TASK_DIR_TTL
    # Fairness on an endpoint shared with other users (tasks of users other than its owner; the
    # owner's own tasks are never capped): whether they may ask for several nodes (MPI), the nodes
    # such tasks of one user hold at once, and the cores and GPUs one user's tasks asking for
    # resources hold at once (a multi-node task's per node times its nodes; 0: no cap). Over a cap a task waits here; a task asking
    # more than a cap alone fails.
    multi_node_for_others: bool = False
    max_nodes_per_user: int = 0
    max_cores_per_user: int = 0
    max_gpus_per_user: int = 0
    provider: ProviderConfig = field(default_factory=lambda: ProviderConfig(min_blocks=1))

    def workers(self) -> int:
        """Workers per pool (per node): max_workers, or the node's usable cores."""
        return self.max_workers or usable_cores()

    def takes_data_only(self) -> bool:
        """Whether the endpoint takes and gives only plain data: ``data_only``,
        or by default, whether it has a function allow-list (whose functions
        must not be reached by code riding in their arguments)."""
        return self.data_only if self.data_only is not None else bool(self.allowed_functions)

    def validate(self) -> None:
        check_endpoint_name(self.name)
        for key, kind in (("endpoint_id", str), ("relay", str), ("max_workers", int), ("prefetch", int),
                          ("heartbeat_period", (int, float)), ("worker_batch", int),
                          ("worker_lost_retries", int), ("heartbeats_missed", int),
                          ("allowed_functions", list), ("sandbox", str), ("sandbox_image", str),
                          ("relay_public_key", str), ("ref_cache_bytes", int),
                          ("available_accelerators", list), ("accelerators_shared", bool), ("mpi_launcher", str),
                          ("task_dir_ttl", (int, float)),
                          ("multi_node_for_others", bool), ("max_nodes_per_user", int),
                          ("max_cores_per_user", int), ("max_gpus_per_user", int)):
            value = getattr(self, key)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
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
        if self.ref_cache_bytes < 1:
            raise ConfigError(f"ref_cache_bytes must be >= 1, not {self.ref_cache_bytes}")
        if not 0 <= self.task_dir_ttl < float("inf"):
            raise ConfigError(f"task_dir_ttl must be a number of seconds >= 0 (0: keep task directories for "
                              f"ever), not {self.task_dir_ttl!r}")
        for key in ("max_nodes_per_user", "max_cores_per_user", "max_gpus_per_user"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0 means no cap), not {getattr(self, key)}")
        if self.worker_lost_retries < 0:
            raise ConfigError(f"worker_lost_retries must be >= 0, not {self.worker_lost_retries}")
        for fn_hash in self.allowed_functions:
            if not (isinstance(fn_hash, str) and re.fullmatch(r"[0-9a-f]{64}", fn_hash)):
                raise ConfigError(f"allowed_functions: {fn_hash!r} is not a function hash (64 hex digits, "
                                  "as printed by 'fedexec function hash')")
        check_accelerators(self.available_accelerators)
        if self.mpi_launcher and not re.fullmatch(r"[A-Za-z0-9_./+-][A-Za-z0-9_./+= -]*", self.mpi_launcher):
            raise ConfigError(f"mpi_launcher must be srun, mpiexec, mpirun or a plain command, not "
                              f"{self.mpi_launcher!r}")
        if self.data_only is not None and not isinstance(self.data_only, bool):
            raise ConfigError(f"data_only must be true or false, not {self.data_only!r}")
        if self.sandbox not in SANDBOXES:
            raise ConfigError(f"sandbox must be one of {', '.join(SANDBOXES)}, not {self.sandbox!r}")
        if self.sandbox in ("apptainer", "podman") and not self.sandbox_image:
            raise ConfigError(f"sandbox {self.sandbox!r} needs sandbox_image (the image its workers run in)")
        if not isinstance(self.provider, ProviderConfig):
            raise ConfigError(f"provider must be a [provider] table, not {self.provider!r}")
        self.provider.validate()
        if self.sandbox != "none" and self.provider.type != "local":
            raise ConfigError(f"sandbox {self.sandbox!r} works with the local provider only (sandboxed workers "
                              "reach their pool over an ipc socket on one machine)")
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
            f"# Arguments and results as plain data only (numbers, text, bytes, lists,\n"
            f"# dicts, numpy arrays...), never pickles, which can run code as they load;\n"
            f"# when not set: on with allowed_functions, off without.\n"
            + (f"data_only = {'true' if self.data_only else 'false'}\n" if self.data_only is not None
               else "# data_only = true\n") +
            f"# The relay's CURVE public key (fedexec relay key); set: traffic is encrypted.\n"
            f'relay_public_key = "{self.relay_public_key}"\n'
            f"# Bytes of DataRefs (ex.put) kept here at most, for all users together; a task\n"
            f"# whose refs do not fit beside the copies other tasks here use fails.\n"
            f"ref_cache_bytes = {self.ref_cache_bytes}\n"
            f"# Accelerator (GPU) ids of each node; empty: found there (nvidia-smi, rocm-smi).\n"
            f"# A task asking for gpus gets its own through CUDA_VISIBLE_DEVICES and the\n"
            f"# ROCm/oneAPI equivalents, unless accelerators_shared = true.\n"
            f"available_accelerators = {json.dumps(self.available_accelerators)}\n"
            f"accelerators_shared = {'true' if self.accelerators_shared else 'false'}\n"
            f"# Launcher of tasks asking for several nodes or MPI ranks (srun, mpiexec, mpirun,\n"
            f"# or a command such as mpiexec.mpich); empty: srun on Slurm, else mpiexec.\n"
            f"mpi_launcher = {json.dumps(self.mpi_launcher)}\n"
            f"# Seconds a shell task's directory (its whole output) is kept after its last\n"
            f"# change, then removed; 0: kept for ever. Default 604800 (7 days).\n"
            f"task_dir_ttl = {self.task_dir_ttl!r}\n"
            f"# Shared with other users (their tasks; never the owner's): whether they may ask\n"
            f"# for several nodes, and the nodes, cores and GPUs one user's tasks asking for\n"
            f"# resources hold at once (0: no cap). Over a cap a task waits; one asking more fails.\n"
            f"multi_node_for_others = {'true' if self.multi_node_for_others else 'false'}\n"
            f"max_nodes_per_user = {self.max_nodes_per_user}\n"
            f"max_cores_per_user = {self.max_cores_per_user}\n"
            f"max_gpus_per_user = {self.max_gpus_per_user}\n"
            f"\n{self.provider.to_toml()}"
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
                 "data_only", "relay_public_key", "ref_cache_bytes", "provider", "available_accelerators",
                 "accelerators_shared", "mpi_launcher", "task_dir_ttl", "multi_node_for_others", "max_nodes_per_user",
                 "max_cores_per_user", "max_gpus_per_user"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
        try:
            if "provider" in data:
                data["provider"] = ProviderConfig.from_dict(data["provider"])
            config = cls(name=name, **data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        config.validate()
        return config


MAX_ACCELERATORS = 1024


def check_accelerators(ids: object) -> list[str]:
    """``available_accelerators``: distinct device ids (digits, or a UUID
    such as GPU-8f0c...), at most MAX_ACCELERATORS; ConfigError otherwise."""
    if not isinstance(ids, list) or len(ids) > MAX_ACCELERATORS or not all(
            isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", i) for i in ids):
        raise ConfigError(f"available_accelerators must be a list of at most {MAX_ACCELERATORS} device ids "
                          f"such as [\"0\", \"1\"], not {ids!r}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"available_accelerators names a device twice: {ids!r}")
    return ids


# -- named endpoint groups ------------------------------------------------------
# ``FederatedExecutor("NAME")`` sends each task to one endpoint of group NAME,
# kept client-side in $FEDEXEC_HOME/groups.toml ('fedexec group set|list|remove').
# The rule for a string: an endpoint id (a UUID) means that endpoint; any other
# string is the name of a group.

def groups_path() -> Path:
    return fedexec_home() / "groups.toml"


def check_group_name(name: str) -> None:
    if not isinstance(name, str) or not ENDPOINT_NAME.match(name):
        raise ConfigError(f"invalid group name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    try:
        uuid.UUID(name)
    except ValueError:
        return
    raise ConfigError(f"invalid group name {name!r}: a UUID means an endpoint id, not a group")


def _endpoint_id(value: object) -> str | None:
    """``value`` as a canonical endpoint id, or None if it is not a UUID."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def load_groups() -> dict[str, list[str]]:
    """The named groups: name -> endpoint ids ({} when there is no groups.toml)."""
    path = groups_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    groups = data.get("groups", {})
    if set(data) - {"groups"} or not isinstance(groups, dict):
        raise ConfigError(f"{path}: expected only a [groups] table of NAME = [ENDPOINT_ID, ...]")
    for name, members in groups.items():
        if (not isinstance(members, list) or not members
                or not all(_endpoint_id(m) == m for m in members)):
            raise ConfigError(f"{path}: group {name!r} must be a non-empty list of endpoint ids (UUIDs)")
    return groups


def save_groups(groups: dict[str, list[str]]) -> Path:
    path = groups_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# fedexec endpoint groups: FederatedExecutor(\"NAME\") sends each task to one of",
             "# the group's endpoints (fedexec group set NAME ENDPOINT... | list | remove NAME).",
             "[groups]"]
    lines += [f"{json.dumps(name)} = {json.dumps(members)}" for name, members in sorted(groups.items())]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def set_group(name: str, endpoints: list[str]) -> list[str]:
    """Make or replace group ``name``; an endpoint is given by its id or by
    the name of an endpoint configured in this fedexec home. Returns the ids."""
    check_group_name(name)
    members: list[str] = []
    for value in endpoints:
        endpoint_id = _endpoint_id(value)
        if endpoint_id is None:
            if not (ENDPOINT_NAME.match(value) and (endpoint_dir(value) / "config.toml").exists()):
                raise ConfigError(f"{value!r} is neither an endpoint id (a UUID) nor an endpoint configured "
                                  f"under {fedexec_home() / 'endpoints'}")
            endpoint_id = EndpointConfig.load(value).endpoint_id
        if endpoint_id not in members:
            members.append(endpoint_id)
    if not members:
        raise ConfigError(f"group {name!r} needs at least one endpoint")
    groups = load_groups()
    groups[name] = members
    save_groups(groups)
    return members


def remove_group(name: str) -> list[str]:
    """Forget group ``name``; returns its endpoint ids."""
    groups = load_groups()
    if name not in groups:
        raise ConfigError(f"there is no endpoint group named {name!r} (in {groups_path()})")
    members = groups.pop(name)
    save_groups(groups)
    return members


def leave_groups(endpoint_id: str) -> tuple[list[str], list[str]]:
    """Take a deleted endpoint out of every named group (``endpoint
    delete``): the names of the groups it left, and of those it was the last
    member of, which are removed (a group of no endpoints could run nothing)."""
    groups = load_groups()
    left, emptied = [], []
    for name, members in list(groups.items()):
        if endpoint_id in members:
            members.remove(endpoint_id)
            if members:
                left.append(name)
            else:
                emptied.append(name)
                del groups[name]
    if left or emptied:
        save_groups(groups)
    return left, emptied


def group_members(name: str) -> list[str]:
    groups = load_groups()
    if name not in groups:
        raise ConfigError(
            f"there is no endpoint group named {name!r} in {groups_path()}: 'fedexec group list' shows the "
            f"groups and 'fedexec group set {name} ENDPOINT_ID...' makes one (an endpoint is given by its id, "
            "a UUID)")
    return list(groups[name])


def endpoint_targets(value: object) -> list[str]:
    """The endpoint ids ``FederatedExecutor(value)`` sends to: an endpoint id
    (a UUID string), a list or tuple of them (a group), or the name of a group
    in groups.toml. Raises ValueError (ConfigError) naming what is wrong."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError("the list of endpoints is empty; give at least one endpoint id")
        members: list[str] = []
        for member in value:
            endpoint_id = _endpoint_id(member)
            if endpoint_id is None:
                raise ConfigError(f"{member!r} in the list of endpoints is not an endpoint id (a UUID)")
            if endpoint_id not in members:
                members.append(endpoint_id)
        return members
    endpoint_id = _endpoint_id(value)
    if endpoint_id is not None:
        return [endpoint_id]
    if not isinstance(value, str):
        raise ConfigError(f"endpoint_id must be an endpoint id, a list of them or a group name, not {value!r}")
    if not ENDPOINT_NAME.match(value):
        raise ConfigError(f"endpoint_id {value!r} is neither an endpoint id (a UUID) nor a group name")
    return group_members(value)
