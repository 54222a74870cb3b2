"""A real, private, single-node Slurm cluster on loopback, for tests.

Why: code that submits work through Slurm (``sbatch``/``srun``/``squeue``/
``scancel``) is only trustworthy when tested against a real ``slurmctld`` and
``slurmd``, not a mock. This module gives a test session such a cluster,
installed and started by the project's own files (a fresh machine has no
Slurm), and stopped afterwards with no job process left behind.

What it does:

* ``ensure_installed()`` installs Debian's ``slurm-wlm`` and ``munge``
  packages with ``apt-get`` when the Slurm daemons are not on the machine
  (running ``apt-get update`` and retrying once if the first try fails).
  Without root, or when apt fails, it raises ``SlurmSetupError`` saying why;
  the ``slurm_cluster`` fixture turns that into ``pytest.fail`` -- never a
  skip, so a machine that cannot run the Slurm tests is seen as broken.
* ``SlurmCluster.start()`` makes a private temp dir holding everything
  (config, state, spool, pid and log files, job scripts and outputs), then:

  - munge: reuses a munged that already answers on the default socket
    (``munge -n | unmunge``) and never stops it; otherwise starts its own
    munged as user ``munge`` on a private socket in the temp dir (creating
    ``/etc/munge/munge.key`` if missing) and stops it in ``stop()``. A private
    socket means two clusters on one machine never depend on each other's
    munged.
  - writes ``slurm.conf``: ``ClusterName`` unique per cluster, controller and
    node on ``<hostname>`` at 127.0.0.1 with free ports (so a second cluster,
    even another test session, can run at the same time), the node line from
    ``slurmd -C`` (NodeName must equal ``hostname``), one partition
    ``debug``, no accounting (so ``sacct`` does not work: use ``squeue`` and
    ``scontrol show job``), no cgroups (``proctrack/linuxproc``,
    ``task/none``), and short timers: ``KillWait=5``, ``OverTimeLimit=0``,
    ``sched_interval=2`` so jobs start and time-limited jobs die quickly.
  - starts ``slurmctld -D -i`` and ``slurmd -D`` as child processes of this
    one (foreground, so they are reaped here: on machines whose PID 1 does
    not reap orphans, daemonizing would leave zombies) and waits until the
    node is ``idle``.
* ``SlurmCluster.env`` is ``os.environ`` plus ``SLURM_CONF``: pass it to every
  ``subprocess`` that runs a Slurm client, or it will look for
  ``/etc/slurm/slurm.conf``.
* ``SlurmCluster.stop()`` cancels every job of the cluster, waits until
  ``squeue`` is empty, stops ``slurmd`` then ``slurmctld`` (by the pids of the
  processes it started, never by a name pattern) and waits for them to exit,
  then kills any process still carrying this cluster's ``SLURM_CONF`` in its
  environment (a job process that escaped its step, a stray slurmstepd), stops
  its own munged, and removes the temp dir (kept when ``FEDEXEC_SLURM_KEEP=1``,
  for reading the logs).

Measured on the 2-core Debian 12 VM (Slurm 22.05.8): install ~5 s when the
apt lists are present; start until the node is idle ~0.35 s; sbatch to
RUNNING ~1 s (slurmctld schedules on a 1 s tick); scancel to gone from squeue
~0.2 s; stop ~0.1 s after the jobs are cancelled. A ``--time=1`` job is
killed 84-89 s after it starts (60-90 s: slurmctld checks time limits every
30 s, a fixed period), so walltime tests are slow.

Inside a batch job, ``srun`` starts one process per node as usual, e.g. a
script with ``#SBATCH --nodes=1`` and the line
``srun --ntasks-per-node=1 python -c '...'``.

Use in a test module::

    from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_x(slurm_cluster):
        subprocess.run(["sbatch", ...], env=slurm_cluster.env, check=True)
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

PACKAGES = ("slurm-wlm", "munge")
# The programs the cluster needs; sbin dirs may be missing from a user's PATH.
PROGRAMS = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol",
            "munged", "munge", "unmunge")
_SBIN_PATH = os.pathsep.join(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmSetupError(RuntimeError):
    """The cluster could not be installed or started; the message says why."""


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def _need(name: str) -> str:
    path = which(name)
    if path is None:
        raise SlurmSetupError(f"{name} is not installed (ensure_installed() should have installed it)")
    return path


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<{path}: {e}>"


def ensure_installed(timeout: float = 900) -> bool:
    """Install Slurm and munge from Debian's packages when missing.

    Returns True when it installed something, False when all was there.
    Raises SlurmSetupError (saying why) when not root or apt-get fails."""
    return ensure_programs(PROGRAMS, PACKAGES, "Slurm", timeout)


MPI_PACKAGES = ("mpich", "libmpich-dev")
MPI_PROGRAMS = ("mpicc.mpich", "mpiexec.mpich")


def ensure_mpich(timeout: float = 900) -> bool:
    """Install Debian's MPICH (``mpicc.mpich``, ``mpiexec.mpich``, PMI-2 for
    ``srun --mpi=pmi2``) when missing, as ensure_installed does Slurm."""
    return ensure_programs(MPI_PROGRAMS, MPI_PACKAGES, "MPICH", timeout)


def ensure_programs(programs: tuple[str, ...], packages: tuple[str, ...], what: str, timeout: float = 900) -> bool:
    """Install ``packages`` with apt-get when one of ``programs`` is missing;
    True when it installed something. SlurmSetupError (saying why) when not
    root or apt-get fails."""
    missing = [p for p in programs if which(p) is None]
    if not missing:
        return False
    why = f"{what} is not installed ({', '.join(missing)} not found)"
    if os.geteuid() != 0:
        raise SlurmSetupError(f"{why}, and installing {' '.join(packages)} with apt-get needs root "
                              f"(running as uid {os.geteuid()})")
    apt = which("apt-get")
    if apt is None:
        raise SlurmSetupError(f"{why}, and apt-get is not available to install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # test processes running side by side (pytest -n) may install at once: apt waits for dpkg's lock
    wait = ["-o", "DPkg::Lock::Timeout=600"]
    install = [apt, *wait, "install", "-y", "-q", "--no-install-recommends", *packages]

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise SlurmSetupError(f"{why}; `{' '.join(cmd)}` did not finish in {timeout:.0f} s") from e

    proc = run(install)
    if proc.returncode != 0:  # stale or missing package lists: update once, retry
        upd = run([apt, *wait, "update", "-q"])
        if upd.returncode != 0:
            raise SlurmSetupError(f"{why}; `apt-get update` exited {upd.returncode}:\n{upd.stderr[-3000:]}\n"
                                  f"(first install try exited {proc.returncode}:\n{proc.stderr[-2000:]})")
        proc = run(install)
    if proc.returncode != 0:
        raise SlurmSetupError(f"{why}; `{' '.join(install)}` exited {proc.returncode}:\n"
                              f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    still = [p for p in programs if which(p) is None]
    if still:
        raise SlurmSetupError(f"installed {' '.join(packages)}, but {', '.join(still)} still not found")
    return True


def free_port() -> int:
    """A TCP port free on all addresses (slurmctld and slurmd bind 0.0.0.0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class SlurmCluster:
    """One private Slurm cluster; see the module docstring. With ``nodes`` >
    1, that many nodes ``node1``... on this one machine, each its own
    ``slurmd -N nodeK`` on a port of its own (Debian's Slurm is built with
    multiple-slurmd support; each node claims the host's real CPUs)."""

    partition = "debug"

    def __init__(self, base_dir: str | os.PathLike | None = None, nodes: int = 1):
        self.nodes = nodes
        self._slurmds: list[subprocess.Popen] = []
        self.hostname = socket.gethostname().split(".")[0]
        self.name = "fx" + uuid.uuid4().hex[:10]
        self._base_dir = base_dir
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.env: dict[str, str] = {}
        self.munge_socket: str | None = None  # None: the default socket
        self._munged: subprocess.Popen | None = None
        self._slurmctld: subprocess.Popen | None = None
        self._slurmd: subprocess.Popen | None = None
        self.started = False
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- start
    def start(self, timeout: float = 60) -> "SlurmCluster":
        t0 = time.monotonic()
        for p in PROGRAMS:
            _need(p)
        self.dir = Path(tempfile.mkdtemp(prefix=f"fedexec-slurm-{self.name}-", dir=self._base_dir))
        self.dir.chmod(0o755)  # munge (its own user) must reach its dir inside
        for sub in ("state", "spool", "log", "jobs"):
            (self.dir / sub).mkdir()
        atexit.register(self.stop)
        try:
            self._start_munge()
            self.conf = self._write_conf()
            self.env = dict(os.environ, SLURM_CONF=str(self.conf))
            self.env.pop("SLURM_JOB_ID", None)  # never look like we run inside someone's job
            self._slurmctld = self._spawn([_need("slurmctld"), "-D", "-i"], "slurmctld")
            self._wait(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0
                       and "UP" in self._run(["scontrol", "ping"], check=False).stdout,
                       timeout, "slurmctld to answer `scontrol ping`", self._slurmctld)
            if self.nodes == 1:
                self._slurmd = self._spawn([_need("slurmd"), "-D"], "slurmd")
                self.started = True
                self._wait(lambda: self.node_state() == "idle", timeout, "the node to be idle", self._slurmd)
            else:
                self._slurmds = [self._spawn([_need("slurmd"), "-D", "-N", name], f"slurmd-{name}")
                                 for name in self.node_names]
                self.started = True
                self._wait(lambda: self.node_states() == ["idle"] * self.nodes, timeout,
                           f"the {self.nodes} nodes to be idle", self._slurmds[0])
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _start_munge(self) -> None:
        if self._munge_works(None):
            return  # a working munged on the default socket: use it, never stop it
        if not MUNGE_KEY.exists():
            subprocess.run([_need("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"]
                           if which("mungekey") else
                           ["dd", "if=/dev/urandom", f"of={MUNGE_KEY}", "bs=1", "count=1024"],
                           check=True, capture_output=True)
        try:
            pw = pwd.getpwnam("munge")
        except KeyError as e:
            raise SlurmSetupError("user munge does not exist (is the munge package installed?)") from e
        os.chown(MUNGE_KEY, pw.pw_uid, pw.pw_gid)
        MUNGE_KEY.chmod(0o400)
        mdir = self.dir / "munge"
        mdir.mkdir()
        mdir.chmod(0o755)  # munged requires its socket dir to be searchable by all
        os.chown(mdir, pw.pw_uid, pw.pw_gid)
        self.munge_socket = str(mdir / "munge.socket")
        cmd = [_need("munged"), "--foreground", f"--socket={self.munge_socket}",
               f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
               f"--seed-file={mdir / 'munged.seed'}", f"--key-file={MUNGE_KEY}"]
        out = open(self.dir / "log" / "munged.out", "wb")
        self._munged = subprocess.Popen(cmd, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=mdir)
        out.close()
        self._wait(lambda: self._munge_works(self.munge_socket), 20, "munged to answer", self._munged,
                   logs=[mdir / "munged.log", self.dir / "log" / "munged.out"])

    @staticmethod
    def _munge_works(sock: str | None) -> bool:
        if not (which("munge") and which("unmunge")):
            return False
        opt = [f"--socket={sock}"] if sock else []
        try:
            cred = subprocess.run([which("munge"), "-n", *opt], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run([which("unmunge"), *opt], input=cred.stdout, capture_output=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _node_line(self) -> str:
        out = subprocess.run([_need("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        fields.pop("NodeName", None)
        fields.setdefault("CPUs", str(os.cpu_count() or 1))
        mem = int(fields.get("RealMemory", "1024") or 1024)
        fields["RealMemory"] = str(max(1, mem))
        rest = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"NodeName={self.hostname} NodeAddr=127.0.0.1 NodeHostname={self.hostname} {rest} State=UNKNOWN"

    @property
    def node_names(self) -> list[str]:
        return [self.hostname] if self.nodes == 1 else [f"node{k}" for k in range(1, self.nodes + 1)]

    def _node_lines(self, ports: list[int]) -> str:
        """One node (this host), or ``nodes`` nodes node1... at 127.0.0.1 on
        ports of their own, with per-node spool, pid, log and TmpFS paths."""
        if self.nodes == 1:
            return self._node_line()
        rest = self._node_line().split(f"NodeHostname={self.hostname} ", 1)[1]
        return "\n".join(f"NodeName={name} NodeAddr=127.0.0.1 Port={port} {rest}"
                         for name, port in zip(self.node_names, ports))

    def _write_conf(self) -> Path:
        d = self.dir
        ctld_port, slurmd_port, *node_ports = _free_ports(2 + (self.nodes if self.nodes > 1 else 0))
        per_node = "/%n" if self.nodes > 1 else ""
        for name in self.node_names if self.nodes > 1 else ():
            for sub in ("spool", "tmp"):
                (d / sub / name).mkdir(parents=True, exist_ok=True)
        auth_info = f"AuthInfo=socket={self.munge_socket}\n" if self.munge_socket else ""
        plugstack = d / "plugstack.conf"
        plugstack.write_text("")  # no SPANK plugins, whatever /etc/slurm holds
        text = f"""\
# Written by tests/slurm_cluster.py: a private single-node test cluster.
ClusterName={self.name}
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
{auth_info}StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}{per_node}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd'}{'.%n' if per_node else ''}.pid
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd'}{'.%n' if per_node else ''}.log
{f"TmpFS={d / 'tmp'}/%n" if per_node else ""}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={plugstack}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
PropagateResourceLimits=NONE
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
OverTimeLimit=0
MinJobAge=300
{self._node_lines(node_ports)}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        conf = d / "slurm.conf"
        conf.write_text(text)
        return conf

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        out = open(self.dir / "log" / f"{name}.out", "wb")
        try:
            return subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir)
        finally:
            out.close()

    def _wait(self, cond, timeout: float, what: str, proc: subprocess.Popen | None = None,
              logs: list[Path] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if cond():
                return
            died = proc is not None and proc.poll() is not None
            if died or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if died else f"timed out after {timeout:.0f} s"
                shown = logs or ([self.dir / "log" / n for n in
                                  ("slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out")]
                                 if self.dir else [])
                text = "\n".join(f"--- {p}:\n{_tail(p)}" for p in shown if p.exists())
                raise SlurmSetupError(f"waiting for {what}: {why}\n{text}")
            time.sleep(0.1)

    # --------------------------------------------------------------- clients
    def _run(self, args: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run([_need(args[0]), *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        """The node's state as sinfo says it ('idle', 'alloc', 'mix', 'down*', ...)."""
        proc = self._run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""

    def node_states(self) -> list[str]:
        """Each node's state, as sinfo says it, in node order."""
        proc = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
        return [states.get(name, "") for name in self.node_names]

    def jobs(self) -> list[str]:
        """Ids of the jobs squeue shows (pending, running, completing...)."""
        out = self._run(["squeue", "-h", "-o", "%i"]).stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, RunTime...): sacct is
        not available (no accounting); records last MinJobAge=300 s after the end."""
        proc = self._run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", proc.stdout))

    def job_state(self, job_id: str | int) -> str:
        return self.job_info(job_id).get("JobState", "")

    def submit(self, script: str, *sbatch_args: str) -> str:
        """sbatch a script text (with its #! line); returns the job id. Output goes to
        <dir>/jobs/slurm-<id>.out unless sbatch_args say --output."""
        jobs = self.dir / "jobs"
        path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=jobs)[1])
        path.write_text(script)
        args = ["sbatch", "--parsable", f"--chdir={jobs}"]
        if not any(a.startswith(("--output", "-o")) for a in sbatch_args):
            args.append(f"--output={jobs / 'slurm-%j.out'}")
        out = self._run([*args, *sbatch_args, str(path)]).stdout.strip()
        return out.split(";")[0]

    def wait_job_gone(self, job_id: str | int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while str(job_id) in self.jobs():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still in squeue after {timeout} s: {self.job_info(job_id)}")
            time.sleep(0.2)

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until squeue is empty and the node is idle again."""
        deadline = time.monotonic() + timeout
        while True:
            jobs, state = self.jobs(), self.node_state()
            if not jobs and state == "idle":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not idle after {timeout} s: jobs {jobs}, node {state!r}")
            time.sleep(0.2)

    # ----------------------------------------------------------------- stop
    def cancel_all(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last = 0.0
        while True:
            try:
                jobs = self.jobs()
            except (RuntimeError, subprocess.TimeoutExpired):
                return  # controller gone: the process sweep in stop() handles leftovers
            if not jobs:
                return
            if time.monotonic() > deadline:
                return
            if time.monotonic() - last > 5:
                self._run(["scancel", *jobs], check=False)
                last = time.monotonic()
            time.sleep(0.2)

    def _own_processes(self) -> list[psutil.Process]:
        """Processes (not this one) whose environment holds this cluster's SLURM_CONF."""
        found = []
        if not self.conf:
            return found
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get("SLURM_CONF") == str(self.conf) and _alive(p):
                    found.append(p)
            except (psutil.Error, OSError):
                continue
        return found

    @staticmethod
    def _terminate(proc: subprocess.Popen | None, timeout: float = 15) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons, kill leftovers, remove the temp dir. Idempotent."""
        if self.dir is None:
            return
        atexit.unregister(self.stop)
        if self._slurmctld is not None and self._slurmctld.poll() is None:
            self.cancel_all()
        self._terminate(self._slurmd)
        for slurmd in self._slurmds:
            self._terminate(slurmd)
        self._terminate(self._slurmctld)
        leftovers = self._own_processes()
        for p in leftovers:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        self._terminate(self._munged)
        self.started = False
        if os.environ.get("FEDEXEC_SLURM_KEEP") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def slurm_cluster4():
    """A started 4-node SlurmCluster (node1..node4 on this machine) with
    Debian's MPICH installed, shared by the session. Fails (never skips)
    when either cannot be installed or the cluster cannot start."""
    try:
        ensure_installed()
        ensure_mpich()
    except SlurmSetupError as e:
        pytest.fail(f"cannot install Slurm and MPICH for the tests: {e}", pytrace=False)
    cluster = SlurmCluster(nodes=4)
    try:
        cluster.start()
    except SlurmSetupError as e:
        pytest.fail(f"cannot start the 4-node test Slurm cluster: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started SlurmCluster shared by the session; installs Slurm if needed.
    Fails (never skips) when Slurm cannot be installed or started."""
    t0 = time.monotonic()
    try:
        installed = ensure_installed()
    except SlurmSetupError as e:
        pytest.fail(f"cannot install Slurm for the tests: {e}", pytrace=False)
    install_time = time.monotonic() - t0
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmSetupError as e:
        pytest.fail(f"cannot start the test Slurm cluster: {e}", pytrace=False)
    if installed:
        cluster.timings["install"] = install_time
    try:
        yield cluster
    finally:
        cluster.stop()
