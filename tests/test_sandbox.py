"""Sandboxed workers: a relay and an endpoint configured with ``sandbox =
"bwrap"`` (real processes, real bubblewrap), and functions that try to get
out: write to the host, reach a server on 127.0.0.1, outlive their walltime.
Then the same with podman, where it can run (root, podman and runc here)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest

import fedexec
from fedexec import FederatedExecutor
from fedexec.config import EndpointConfig
from fedexec.worker import sandbox

from test_faults import lookup_endpoint, running_relay, stop_process, tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 30.0


# -- functions run in the sandbox ----------------------------------------------------

def write_in_working_dir(name):
    """Writes a file where it runs, and one beside it in the task root;
    returns where it ran, what its directory held, and what the task root
    held meanwhile."""
    cwd = os.getcwd()
    with open(name, "w") as f:
        f.write("scratch")
    with open(os.path.join("..", f"left-by-{os.path.basename(cwd)}"), "w") as f:
        f.write("for the next task to find")
    return cwd, sorted(os.listdir(cwd)), sorted(os.listdir(sandbox.TASK_ROOT))


def try_to_write(paths):
    """``{path: "written" | errno name}`` for each path opened for writing."""
    outcome = {}
    for path in paths:
        try:
            with open(path, "w") as f:
                f.write("escaped")
            outcome[path] = "written"
        except OSError as exc:
            outcome[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    return outcome


def can_see(paths):
    return {path: os.path.exists(path) for path in paths}


def try_to_connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def start_child_then_sleep(tag):
    """Starts a process of its own (in its own session, as a daemon would),
    then outlives any walltime."""
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", tag], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(120)


def identity(x):
    return x


def large_in_sandbox(array):
    """Runs on a large argument in the sandbox: returns ``array + 1`` (a
    large result), what its inbox and outbox held, whether it could write
    its arguments' file, and whether its arguments are writable in memory."""
    inbox = sorted(os.listdir(sandbox.TASK_IN))
    outbox = sorted(os.listdir(sandbox.TASK_OUT))
    try:
        with open(os.path.join(sandbox.TASK_IN, inbox[0]), "r+b") as f:
            f.write(b"changed")
        write = "written"
    except OSError as exc:
        write = errno.errorcode.get(exc.errno, str(exc.errno))
    array[0] += 0   # the argument is an ordinary, writable array
    return array + 1, inbox, outbox, write


def ref_in_sandbox(values, scale):
    """Runs on a DataRef's array (inside a list) in the sandbox: its sum
    times ``scale``, and what the inbox held."""
    return float(values[0].sum()) * scale, sorted(os.listdir(sandbox.TASK_IN))


# -- fixtures ----------------------------------------------------------------------------

def apt_install(*packages: str) -> str:
    """Install Debian packages (the tests' own set-up, as CI runs it on a
    fresh machine, as root); what went wrong, or "" if it worked."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"installing {' '.join(packages)} needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=600"]   # test processes side by side (pytest -n) may install at once
    install = ["apt-get", *wait, "install", "-y", "-q", *packages]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        subprocess.run(["apt-get", *wait, "update", "-q"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    return "" if done.returncode == 0 else f"apt-get install {' '.join(packages)} failed: {done.stderr[-500:]}"


@pytest.fixture(scope="session")
def bwrap() -> str:
    """bubblewrap's path, installed with apt-get when missing. The sandbox is
    a requirement, not an option: a machine where it cannot be installed or
    cannot run fails these tests, saying why."""
    problem = apt_install("bubblewrap") if shutil.which("bwrap") is None else ""
    path = shutil.which("bwrap")
    if path is None:
        pytest.fail(f"bubblewrap (bwrap) is needed and could not be installed: {problem}")
    try:
        sandbox.check("bwrap")
    except sandbox.SandboxUnavailable as exc:
        pytest.fail(f"bwrap is installed but cannot sandbox here: {exc}")
    return path


class Federation:
    """A relay and one configured, sandboxed endpoint, in a fedexec home of their own."""

    def __init__(self, directory: Path, address: str, endpoint: subprocess.Popen, config: EndpointConfig,
                 log: Path) -> None:
        self.directory = directory
        self.address = address
        self.endpoint = endpoint
        self.config = config
        self.log = log

    def workers(self) -> list[psutil.Process]:
        """The worker processes (the Python inside each sandbox), by host pid."""
        found = []
        for proc in psutil.Process(self.endpoint.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmdline = proc.cmdline()
                if "fedexec.worker" in cmdline and Path(cmdline[0]).name.startswith("python"):
                    found.append(proc)
        return found

    def task_roots(self) -> list[Path]:
        """The host directories the workers see as their task root."""
        roots = []
        pools = [psutil.Process(pid) for pid in pools_of(self.endpoint.pid)]
        for proc in (child for pool in pools for child in pool.children()):   # bwrap or podman
            with contextlib.suppress(psutil.Error, ValueError):
                cmdline = proc.cmdline()
                roots.append(Path(cmdline[cmdline.index(sandbox.TASK_ROOT) - 1]))
        return roots


@contextlib.contextmanager
def sandboxed_federation(directory: Path, kind: str, image: str = "", workers: int = 2,
                         env: dict[str, str] | None = None, **settings: Any):
    """A relay and an endpoint with ``sandbox = kind`` (and other config
    ``settings``), its config written to the fedexec home (the endpoint's
    command line has no sandbox flag)."""
    with running_relay(directory) as address:
        config = EndpointConfig(name=f"sandboxed-{kind}", relay=address, max_workers=workers, sandbox=kind,
                                sandbox_image=image, heartbeat_period=0.5, **settings)
        config.save()
        log = directory / "endpoint.log"
        with open(log, "wb") as out:
            endpoint = subprocess.Popen(
                [sys.executable, "-m", "fedexec.endpoint", "--name", config.name, "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=directory,
                env={**os.environ, **(env or {})})
        try:
            lookup_endpoint(address, config.endpoint_id, endpoint, log)
            yield Federation(directory, address, endpoint, config, log)
        finally:
            stop_process(endpoint)


@pytest.fixture(scope="module")
def bwrap_federation(bwrap, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sandbox")
    with pytest.MonkeyPatch.context() as mp:
        # its own fedexec home: the executor finds the relay's secret there as it starts
        mp.setenv("FEDEXEC_HOME", str(directory / "fedexec-home"))
        mp.delenv("FEDEXEC_RELAY", raising=False)
        with sandboxed_federation(directory, "bwrap") as federation:
            with FederatedExecutor(federation.config.endpoint_id, relay=federation.address) as ex:
                federation.executor = ex
                yield federation


# -- bwrap ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_each_task_runs_in_a_private_directory_removed_after(bwrap_federation):
    ex = bwrap_federation.executor
    runs = list(ex.map(write_in_working_dir, ["scratch.txt"] * 6))
    cwds = [cwd for cwd, _, _ in runs]
    assert all(os.path.dirname(cwd) == sandbox.TASK_ROOT for cwd in cwds), cwds
    assert len(set(cwds)) == len(cwds), f"two tasks shared a working directory: {cwds}"
    for cwd, listing, task_root in runs:
        assert listing == ["scratch.txt"], "a task's directory was not fresh"
        assert task_root == sorted([os.path.basename(cwd), f"left-by-{os.path.basename(cwd)}"]), \
            f"an earlier task left something in the task root: {task_root}"
    roots = bwrap_federation.task_roots()
    assert len(roots) == 2, roots
    for root in roots:  # on the host: nothing left once the tasks are done
        assert root.is_dir() and list(root.iterdir()) == [], f"{root} holds {list(root.iterdir())}"


@pytest.mark.timeout(60)
def test_a_sandboxed_task_cannot_write_to_the_host(bwrap_federation, tmp_path):
    ex = bwrap_federation.executor
    name = f"fedexec-escape-{uuid.uuid4().hex[:8]}"
    visible = ["/etc", "/usr", sys.prefix, os.path.dirname(fedexec.__file__)]   # there, read-only
    hidden = [str(tmp_path), "/root", "/home"]                                    # not there at all
    paths = [os.path.join(d, name) for d in visible + hidden] + [f"/{name}"]
    outcome = ex.submit(try_to_write, paths).result(DEADLINE)
    for path in paths:
        assert outcome[path] != "written", f"a sandboxed task wrote {path}"
        assert not os.path.exists(path), f"{path} appeared on the host"
    for directory in visible + ["/"]:
        assert outcome[os.path.join(directory, name)] == "EROFS", outcome
    # what it cannot see: the test's files, the fedexec home (with the relay's secret), home directories
    home = str(bwrap_federation.directory / "fedexec-home")
    assert os.path.isdir(os.path.join(home, "relays"))
    seen = ex.submit(can_see, [str(tmp_path), home, os.path.expanduser("~/.bashrc")]).result(DEADLINE)
    assert seen == dict.fromkeys(seen, False), f"the sandbox sees host files: {seen}"


@pytest.mark.timeout(120)
def test_a_sandboxed_task_gets_its_large_arguments_read_only_and_returns_a_large_result(bwrap_federation):
    import numpy as np
    ex = bwrap_federation.executor
    array = np.arange(3 * 1024 * 1024, dtype=np.float64)   # 24 MiB: over the 16 MiB of the large path
    futures = [ex.submit(large_in_sandbox, array) for _ in range(3)]
    for future in futures:
        out, inbox, outbox, write = future.result(DEADLINE)
        assert out.shape == array.shape and out[0] == 1.0 and out[-1] == array[-1] + 1
        # its own arguments' file alone, read-only; nothing else of the agent's spool in view
        assert inbox == [future._task_bytes.hex() + ".args"], inbox
        assert outbox == [], outbox
        assert write == "EROFS", write
    roots = bwrap_federation.task_roots()
    for root in roots:   # on the host: the inboxes and outboxes are empty once the tasks are done
        for box in (root.with_suffix(".in"), root.with_suffix(".out")):
            assert box.is_dir() and list(box.iterdir()) == [], f"{box} holds {list(box.iterdir())}"
            assert box.stat().st_mode & 0o777 == 0o700


@pytest.mark.timeout(120)
def test_a_sandboxed_task_reads_a_dataref(bwrap_federation):
    """A DataRef's file (the agent's cached copy) is shared into the task's
    inbox like large arguments, and leaves it with the task."""
    import numpy as np
    ex = bwrap_federation.executor
    array = np.arange(1024 * 1024, dtype=np.float64)
    ref = ex.put(array)
    try:
        futures = [ex.submit(ref_in_sandbox, [ref], n) for n in range(4)]
        for n, future in enumerate(futures):
            total, inbox = future.result(DEADLINE)
            assert total == float(array.sum()) * n
            assert inbox == [f"{future._task_bytes.hex()}.{ref.id}.ref"], inbox
    finally:
        ref.delete()
    for root in bwrap_federation.task_roots():
        box = root.with_suffix(".in")
        assert list(box.iterdir()) == [], f"{box} holds {list(box.iterdir())}"


def big_result_in_sandbox(scale):
    import numpy as np
    return np.ones(20 * 2**17) * scale   # 20 MiB: a result that travels in chunks


def big_dependency_in_sandbox(array, plus):
    """Runs on a dependency's large result in the sandbox: its sum plus ``plus``, and what the inbox held."""
    return float(array.sum()) + plus, sorted(os.listdir(sandbox.TASK_IN))


@pytest.mark.timeout(120)
def test_a_sandboxed_task_reads_a_dependencys_large_result(bwrap_federation):
    """A dependency's result over 16 MiB (its file in the agent's spool) is
    shared into its dependent's inbox like a DataRef's file, and leaves it
    with the task."""
    ex = bwrap_federation.executor
    first = ex.submit(big_result_in_sandbox, 3.0)
    dependent = ex.submit(big_dependency_in_sandbox, first, 1)
    total, inbox = dependent.result(DEADLINE)
    assert total == 3.0 * 20 * 2**17 + 1
    assert inbox == [f"{dependent._task_bytes.hex()}.{first._task_bytes.hex()}.ref"], inbox
    assert first.result(DEADLINE)[0] == 3.0
    for root in bwrap_federation.task_roots():
        box = root.with_suffix(".in")
        assert list(box.iterdir()) == [], f"{box} holds {list(box.iterdir())}"


@pytest.mark.timeout(60)
def test_a_sandboxed_task_cannot_reach_a_server_on_loopback(bwrap_federation):
    with running_server() as (server, port):
        assert try_to_connect(port) == "connected"   # from here it can
        server.accept()[0].close()
        answer = bwrap_federation.executor.submit(try_to_connect, port).result(DEADLINE)
        assert answer.startswith(("ConnectionRefusedError", "OSError")), answer
        with pytest.raises(BlockingIOError):
            server.accept()   # nobody came


@pytest.mark.timeout(60)
def test_walltime_kills_the_whole_sandbox_and_the_worker_is_replaced(bwrap_federation):
    fed = bwrap_federation
    ex = fed.executor
    assert ex.submit(identity, 1).result(DEADLINE) == 1
    before = {p.pid for p in fed.workers()}
    assert len(before) == 2, f"expected 2 workers, found {before}:\n{tail(fed.log)}"
    tag = f"fedexec-sandbox-child-{uuid.uuid4().hex}"
    slow = ex.submit(fedexec.with_options(start_child_then_sleep, timeout=2.0), tag)
    deadline = time.monotonic() + 10
    while not [p for p in psutil.process_iter(["cmdline"]) if tag in (p.info["cmdline"] or [])]:
        assert time.monotonic() < deadline and not slow.done(), "the task's own process never started"
        time.sleep(0.02)
    with pytest.raises(fedexec.TaskTimeout):
        slow.result(DEADLINE)
    deadline = time.monotonic() + 10
    while True:  # the killed worker and the process its task started are gone; a new worker took its place
        left = [p for p in psutil.process_iter(["cmdline"]) if tag in (p.info["cmdline"] or [])]
        now = {p.pid for p in fed.workers()}
        gone = {pid for pid in before if not psutil.pid_exists(pid)}
        if not left and len(gone) == 1 and len(now) == 2 and len(now - before) == 1:
            break
        if time.monotonic() > deadline:
            for proc in left:  # do not leave it behind (by pid, it is ours)
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            pytest.fail(f"after the walltime kill: processes the task started still alive: {left}; "
                        f"workers before {before}, now {now}:\n{tail(fed.log)}")
        time.sleep(0.1)
    assert [ex.submit(identity, i).result(DEADLINE) for i in range(4)] == list(range(4))
    assert fed.endpoint.poll() is None


@pytest.mark.timeout(60)
def test_a_missing_sandbox_tool_fails_the_endpoint_start_by_name(tmp_path):
    config = EndpointConfig(name="needs-apptainer", relay="tcp://127.0.0.1:9", sandbox="apptainer",
                            sandbox_image="/images/python.sif")
    config.save()
    empty = tmp_path / "empty-path"   # a PATH with no apptainer on it, whatever this machine has
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "fedexec.endpoint", "--name", config.name], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": str(empty)})
    assert done.returncode != 0
    assert "'apptainer' command" in done.stderr and "not on PATH" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.timeout(60)
def test_killing_the_endpoint_ends_its_sandboxed_workers(bwrap, tmp_path):
    """--die-with-parent: an endpoint killed with SIGKILL takes its sandboxes along."""
    with sandboxed_federation(tmp_path, "bwrap") as fed:
        with FederatedExecutor(fed.config.endpoint_id, relay=fed.address) as ex:
            assert ex.submit(identity, 7).result(DEADLINE) == 7
            workers = fed.workers()
            assert len(workers) == 2, tail(fed.log)
            fed.endpoint.kill()
            fed.endpoint.wait(10)
            gone, alive = psutil.wait_procs(workers, timeout=10)
            assert not alive, f"sandboxed workers outlived their endpoint: {alive}"
            ex.shutdown(wait=False, cancel_futures=True)


# -- podman --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def podman_site(tmp_path_factory):
    """A root filesystem directory for ``sandbox_image`` and a containers.conf
    (CONTAINERS_CONF) for this host: runc with cgroupfs, ulimits the host
    allows, and the host's Python (this venv, fedexec) mounted read-only into
    every container, with ``python3`` first on PATH. Podman and runc are
    installed with apt-get when missing; where that, or running a
    container, is impossible, the test fails saying why."""
    problem = apt_install("podman", "runc") if not (shutil.which("podman") and shutil.which("runc")) else ""
    if os.geteuid() != 0 or not (shutil.which("podman") and shutil.which("runc")):
        pytest.fail(f"the podman test needs root, podman and runc: {problem or 'not root'}")
    import resource

    directory = tmp_path_factory.mktemp("podman")
    rootfs = directory / "rootfs"
    for mount_point in ("proc", "dev", "sys", "tmp", "etc", "task"):
        (rootfs / mount_point).mkdir(parents=True)
    volumes = []
    for path, link in sandbox.host_view():
        if path == "/etc":
            continue
        if link:
            (rootfs / path.lstrip("/")).symlink_to(link)
        else:
            (rootfs / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            volumes.append(f"{path}:{path}:ro")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    conf = directory / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={soft}:{hard}", "nproc=4096:4096"]\n'
        f"volumes = {volumes!r}\n".replace("'", '"') +
        f'env = ["PATH={os.path.dirname(sys.executable)}:/usr/bin:/bin"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n')
    env = {"CONTAINERS_CONF": str(conf)}
    probe = subprocess.run(["podman", "run", "--rm", "--network=none", "--read-only", "--rootfs", str(rootfs),
                            "python3", "-c", "import fedexec.worker"], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.fail(f"podman cannot run this host's Python in a container here: {probe.stderr.strip()[-500:]}")
    return str(rootfs), env


def pools_of(endpoint_pid: int) -> list[int]:
    """Pids of the processes the pools of the endpoint with this pid run in:
    its pool processes, or the endpoint itself when its pools run in its
    own process (the local provider's default)."""
    return [p.pid for p in psutil.Process(endpoint_pid).children() if "fedexec.pool" in p.cmdline()] or [
        endpoint_pid]


def containers_of(pool_pids: list[int], env: dict[str, str]) -> list[str]:
    """Names of the running containers of these pools (workers are named after their pool's pid)."""
    done = subprocess.run(["podman", "ps", "--format", "{{.Names}}"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=30)
    return [name for name in done.stdout.split() if name.startswith(tuple(f"fedexec-w{p}-" for p in pool_pids))]


@pytest.mark.timeout(120)
def test_podman_sandbox(podman_site, tmp_path):
    """The same guarantees with podman: a private directory per task, the host
    read-only or out of sight, no network; a walltime kill removes the
    container (not only the podman client), and containers stop by
    themselves when their endpoint is killed."""
    rootfs, env = podman_site
    with running_server() as (server, port), \
            sandboxed_federation(tmp_path, "podman", image=rootfs, workers=1, env=env) as fed:
        pid = fed.endpoint.pid
        try:
            with FederatedExecutor(fed.config.endpoint_id, relay=fed.address) as ex:
                runs = [ex.submit(write_in_working_dir, "scratch.txt").result(DEADLINE) for _ in range(2)]
                assert runs[0][0] != runs[1][0] and all(os.path.dirname(r[0]) == sandbox.TASK_ROOT for r in runs)
                assert all(r[1] == ["scratch.txt"] and len(r[2]) == 2 for r in runs), runs
                name = f"fedexec-escape-{uuid.uuid4().hex[:8]}"
                paths = [os.path.join(sys.prefix, name), f"/usr/{name}", f"/{name}", str(tmp_path / name)]
                outcome = ex.submit(try_to_write, paths).result(DEADLINE)
                assert [outcome[p] for p in paths] == ["EROFS", "EROFS", "EROFS", "ENOENT"], outcome
                assert not any(os.path.exists(p) for p in paths)
                assert ex.submit(try_to_connect, port).result(DEADLINE) != "connected"
                with pytest.raises(BlockingIOError):
                    server.accept()

                pid = pools_of(fed.endpoint.pid)
                [before] = containers_of(pid, env)
                with pytest.raises(fedexec.TaskTimeout):
                    ex.submit(fedexec.with_options(identity_after, timeout=1.0), 120, 0).result(DEADLINE)
                assert ex.submit(identity, 5).result(DEADLINE) == 5   # on a new container
                deadline = time.monotonic() + 10
                while before in containers_of(pid, env):
                    assert time.monotonic() < deadline, f"container {before} outlived its walltime kill"
                    time.sleep(0.2)
                [after] = containers_of(pid, env)

                fed.endpoint.kill()
                fed.endpoint.wait(10)
                deadline = time.monotonic() + 15
                while containers_of(pid, env):
                    assert time.monotonic() < deadline, f"container {after} outlived its endpoint"
                    time.sleep(0.2)
                ex.shutdown(wait=False, cancel_futures=True)
        finally:
            for name in containers_of(pid, env):  # ours, by name
                subprocess.run(["podman", "rm", "-f", name], env={**os.environ, **env}, capture_output=True,
                               timeout=60)


def identity_after(seconds, x):
    time.sleep(seconds)
    return x


@contextlib.contextmanager
def running_server():
    """A TCP server on 127.0.0.1 that accepts nothing unless asked; yields (socket, port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0)
        yield server, server.getsockname()[1]
