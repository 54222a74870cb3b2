"""Sandboxed workers: the command line that starts a worker inside a sandbox.

An endpoint runs functions sent by whoever may use it. With the endpoint
setting ``sandbox`` other than ``none``, each worker runs inside a sandbox
that sees the host read-only (or not at all), has no network, and writes
only to a task root of its own: the worker gives each task a fresh directory
under it and removes it afterwards. The worker still talks to its pool over
an ipc channel of its own (``pool/workers.py``), the one path (with the
worker's marker file) bound into the sandbox besides the task root: no
other worker's channel, nor the endpoint's socket for its pools, is in view.

- ``bwrap`` (bubblewrap): the worker runs with the endpoint's own Python.
  The system directories, Python's prefixes and ``sys.path`` are bound
  read-only (not the rest of the host: home directories, the fedexec home
  and its secrets, /tmp stay out of sight), in new namespaces of every kind
  with all capabilities dropped (as root, bwrap otherwise keeps them, and
  one could remount the host writable). In a pid namespace the worker's
  parent is bwrap's init, not the endpoint; ``--die-with-parent`` ties that
  init to the bwrap process the endpoint started, so killing that process
  (a walltime, a stop) ends the whole namespace: the worker and anything the
  task started.
- ``podman`` and ``apptainer``: the worker runs with ``python3`` from
  ``sandbox_image`` (an image name, or for podman a root filesystem
  directory: an absolute path), which must have the endpoint's Python minor
  version and fedexec installed. Host settings (runtime, cgroup manager,
  ulimits) belong in the tool's own configuration (containers.conf,
  apptainer.conf). Neither parent check works across a container's pid
  namespace, so these workers stop when the endpoint's socket closes.

Large payloads (``transfer.py``): a task's large arguments are a file in the
endpoint agent's private spool, which no sandbox sees. Each sandboxed worker
has two more directories of its own: an inbox, bound read-only at TASK_IN,
where its pool hard-links the arguments' file of each task it sends that
worker (and removes it when the task is done), and an outbox, bound
writable at TASK_OUT, where the worker writes a large result (SPOOL_ENV
points there inside), which the pool moves into the agent's spool once it
checked it is a plain file of that task (:func:`share_arguments`,
:func:`take_result`). So a worker sees its own tasks' large arguments, only
those, and cannot change them; nothing else of the spool is in view.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
from typing import Any

from .. import protocol as P
from ..config import ConfigError
from ..dataref import named_refs, wrap_arguments
from ..taskdirs import SANDBOX_DIR_ENV, SANDBOX_HOST_DIR_ENV
from ..transfer import SPOOL_ENV, is_local, local_ref, parse_local

TASK_ROOT = "/task"             # where a sandboxed worker's task root appears
TASK_IN = "/task-in"            # its inbox: its tasks' large arguments, read-only
TASK_OUT = "/task-out"          # its outbox: where it writes large results
TASK_KEPT = "/task-kept"        # where its shell tasks keep their output (taskdirs.py)
TOOLS = {"bwrap": "bwrap", "podman": "podman", "apptainer": "apptainer"}
INSTALL_HINT = {
    "bwrap": "Debian/Ubuntu: apt-get install bubblewrap; Fedora/RHEL: dnf install bubblewrap",
    "podman": "Debian/Ubuntu: apt-get install podman runc",
    "apptainer": "see https://apptainer.org/docs/admin/main/installation.html",
}
# Host directories every bwrap sandbox sees read-only (those that exist; a
# symlink, as /lib -> usr/lib on merged-/usr systems, stays a symlink).
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(ConfigError):
    """The configured sandbox cannot run on this machine; the message says why."""


def tool(kind: str) -> str:
    """The path of ``kind``'s command, or SandboxUnavailable naming it."""
    found = shutil.which(TOOLS[kind])
    if found is None:
        raise SandboxUnavailable(
            f"sandbox {kind!r} needs the {TOOLS[kind]!r} command, which is not on PATH "
            f"({INSTALL_HINT[kind]}), or set sandbox = \"none\"")
    return found


def check(kind: str) -> None:
    """Fail at endpoint start, with a clear message, when ``kind`` cannot run
    workers here. bwrap is tried once (namespaces may be forbidden, e.g. in an
    unprivileged container); the container tools only need to exist, since
    starting an image can take long."""
    if kind == "none":
        return
    if kind not in TOOLS:
        raise SandboxUnavailable(f"unknown sandbox {kind!r}")
    tool(kind)
    if kind == "bwrap":
        probe = bwrap_command([sys.executable, "-c", "import fedexec.worker"], [])
        try:
            result = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise SandboxUnavailable("bwrap did not start Python within 60 s") from None
        if result.returncode != 0:
            why = result.stderr.decode(errors="replace").strip()[-800:]
            raise SandboxUnavailable(f"bwrap cannot run a worker here (exit code {result.returncode}): {why}")


def worker_command(kind: str, worker_args: list[str], *, socket_path: str, marker_path: str,
                   task_dir: str, image: str = "", name: str = "", inbox: str = "",
                   outbox: str = "", kept: str = "") -> list[str]:
    """The command that runs ``python -m fedexec.worker WORKER_ARGS`` inside
    sandbox ``kind``, seeing ``socket_path`` and ``marker_path`` at their own
    paths, ``task_dir`` (on the host) as its task root, TASK_ROOT, and (if
    given) ``inbox`` read-only at TASK_IN and ``outbox`` at TASK_OUT, where
    it writes large results, and ``kept`` (a host directory; if given) at
    TASK_KEPT, where its shell tasks leave their output (``taskdirs.py``;
    told its host path, to name it in their results). ``name`` names the container (podman)."""
    binds = [(socket_path, socket_path), (marker_path, marker_path), (task_dir, TASK_ROOT)]
    read_only = [(inbox, TASK_IN)] if inbox else []
    env = {}
    if outbox:
        binds.append((outbox, TASK_OUT))
        env[SPOOL_ENV] = TASK_OUT
    if kept:
        binds.append((kept, TASK_KEPT))
        env[SANDBOX_DIR_ENV] = TASK_KEPT
        env[SANDBOX_HOST_DIR_ENV] = kept
    args = [*worker_args, "--task-root", TASK_ROOT]
    if kind == "bwrap":
        return bwrap_command([sys.executable, "-m", "fedexec.worker", *args], binds, read_only, env)
    program = ["python3", "-m", "fedexec.worker", *args, "--exit-on-disconnect"]
    if kind == "podman":
        return podman_command(program, binds, image, name, read_only, env)
    if kind == "apptainer":
        return apptainer_command(program, binds, image, read_only, env)
    raise SandboxUnavailable(f"unknown sandbox {kind!r}")


def bwrap_command(program: list[str], binds: list[tuple[str, str]], read_only: list[tuple[str, str]] = (),
                  env: dict[str, str] | None = None) -> list[str]:
    """bubblewrap: the host view read-only, a private /tmp, /dev and /proc,
    ``binds`` (host, inside) read-write, ``read_only`` ones read-only,
    everything else read-only too; ``env`` set inside; no network, no
    capabilities; dies with the process that started it."""
    view = host_view()
    under_tmp = [path for path, _ in view if path.startswith("/tmp/")]
    cmd = [tool("bwrap"), "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--new-session"]
    for path, link in view:
        if path not in under_tmp:
            cmd += ["--symlink", link, path] if link else ["--ro-bind", path, path]
    cmd += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for path in under_tmp:  # after the private /tmp, or it would hide them
        cmd += ["--ro-bind", path, path]
    for source, dest in binds:
        cmd += ["--bind", source, dest]
    for source, dest in read_only:
        cmd += ["--ro-bind", source, dest]
    for key, value in (env or {}).items():
        cmd += ["--setenv", key, value]
    cwd = TASK_ROOT if any(dest == TASK_ROOT for _, dest in binds) else "/"
    return [*cmd, "--remount-ro", "/", "--chdir", cwd, "--", *program]


def podman_command(program: list[str], binds: list[tuple[str, str]], image: str, name: str,
                   read_only: list[tuple[str, str]] = (), env: dict[str, str] | None = None) -> list[str]:
    """podman: a read-only container without network or capabilities,
    removed when it exits; ``image`` is an image, or a root filesystem
    directory when it is an absolute path."""
    cmd = [tool("podman"), "run", "--rm", "--replace", "--interactive", "--name", name, "--network=none",
           "--read-only", "--cap-drop=all", "--security-opt=no-new-privileges", "--workdir", TASK_ROOT]
    for source, dest in binds:
        cmd += ["--volume", f"{source}:{dest}:rw"]
    for source, dest in read_only:
        cmd += ["--volume", f"{source}:{dest}:ro"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    cmd += ["--rootfs", image] if image.startswith("/") else [image]
    return [*cmd, *program]


def apptainer_command(program: list[str], binds: list[tuple[str, str]], image: str,
                      read_only: list[tuple[str, str]] = (), env: dict[str, str] | None = None) -> list[str]:
    """apptainer (untested): ``--containall`` (private /tmp, home, pid and
    ipc namespaces, a clean environment) and no network."""
    cmd = [tool("apptainer"), "exec", "--containall", "--net", "--network", "none", "--pwd", TASK_ROOT]
    for source, dest in binds:
        cmd += ["--bind", f"{source}:{dest}:rw"]
    for source, dest in read_only:
        cmd += ["--bind", f"{source}:{dest}:ro"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    return [*cmd, image, *program]


# -- large payloads across the sandbox's wall ------------------------------------------------
def share_arguments(inbox: str, task_id: bytes, blob: Any) -> Any:
    """A task's arguments as its sandboxed worker sees them: a local
    reference (a file in the agent's spool: the agent makes these, and
    refuses them from anyone else) becomes its file hard-linked (copied,
    across filesystems) into the worker's inbox, named as its reference
    inside; arguments naming DataRefs (dataref.wrap_arguments) have each
    ref's file shared so too; anything else stays as it is."""
    if not is_local(blob):
        return blob
    raw = P.as_bytes(blob)
    unshare_arguments(inbox, task_id)   # (a task tried again by the same worker)
    refs = named_refs(raw)
    if refs is None:
        path, size, digest = parse_local(raw)
        return local_ref(_share(inbox, f"{task_id.hex()}.args", path), size, digest)
    args, files = refs
    shared = {ref_id: _share(inbox, f"{task_id.hex()}.{ref_id.hex()}.ref", path) for ref_id, path in files.items()}
    if is_local(args):
        path, size, digest = parse_local(P.as_bytes(args))
        args = local_ref(_share(inbox, f"{task_id.hex()}.args", path), size, digest)
    return wrap_arguments(args, shared)


def _share(inbox: str, name: str, path: str) -> str:
    """``path`` linked (or copied) into ``inbox`` as ``name``: its path inside the sandbox."""
    target = os.path.join(inbox, name)
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
        os.chmod(target, 0o600)
    return os.path.join(TASK_IN, name)


def unshare_arguments(inbox: str, task_id: bytes) -> None:
    """The task is done (or goes elsewhere): its files leave the inbox."""
    prefix = task_id.hex() + "."
    try:
        names = [name for name in os.listdir(inbox) if name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(inbox, name))
        except OSError:
            pass


def take_result(outbox: str, task_id: bytes, status: int, blob: Any) -> tuple[int, Any]:
    """A sandboxed worker's result as the agent takes it: a local reference
    naming a file in its outbox (TASK_OUT inside) is moved to the agent's
    spool (SPOOL_ENV) and named there, once it is a plain file of this task
    (not a link: the worker chose what is there) of the size it says; a
    reference to anything else fails the task. Other results as they are."""
    if not is_local(blob):
        return status, blob
    try:
        path, size, digest = parse_local(P.as_bytes(blob))
    except Exception:
        return P.FAILED, P.pack_failure(P.REJECTED, "the worker sent a malformed large-result reference")
    name = os.path.basename(path)
    if os.path.dirname(path) != TASK_OUT or not name.startswith(task_id.hex() + "."):
        return P.FAILED, P.pack_failure(P.REJECTED, f"the sandboxed worker's large result is not a file of "
                                                    f"this task in {TASK_OUT}; it was not sent")
    host = os.path.join(outbox, name)
    spool = os.environ.get(SPOOL_ENV, "")
    try:
        info = os.lstat(host)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size != size:
            raise ValueError("not a plain file of the size its reference says")
        if not spool:
            raise ValueError("the pool has no spool to move it to")
        os.rename(host, os.path.join(spool, name))
    except (OSError, ValueError) as exc:
        try:
            os.unlink(host)
        except OSError:
            pass
        return P.FAILED, P.pack_failure(P.REJECTED, f"the sandboxed worker's large result could not be taken: "
                                                    f"{exc}")
    return status, local_ref(os.path.join(spool, name), size, digest)


@functools.lru_cache(maxsize=1)
def host_view() -> tuple[tuple[str, str | None], ...]:
    """The host paths a bwrap worker sees, read-only, as ``(path, symlink
    target or None)``: SYSTEM_DIRS, this Python's prefixes (a venv and the
    Python it was made from, wherever they live), every ``sys.path``
    directory but the current one (with ``-m``, the endpoint's working
    directory), and the directory fedexec is imported from (an editable
    install). Paths under one already listed are left out."""
    import fedexec

    wanted = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.dirname(os.path.abspath(fedexec.__file__)))]
    cwd = os.getcwd()
    wanted += [p for p in sys.path if p and os.path.abspath(p) != cwd]
    wanted += [os.path.realpath(p) for p in wanted]
    paths = {os.path.abspath(p) for p in wanted if os.path.isdir(p)}
    system = [p for p in SYSTEM_DIRS if os.path.lexists(p)]
    view: list[tuple[str, str | None]] = []
    for path in system + sorted(paths - set(system)):
        if any(path == seen or path.startswith(seen.rstrip("/") + "/") for seen, _ in view):
            continue
        link = os.readlink(path) if path in SYSTEM_DIRS and os.path.islink(path) else None
        view.append((path, link))
    return tuple(view)
