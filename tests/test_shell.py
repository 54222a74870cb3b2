"""ShellFunction (issue 14, item 1): shell commands run as tasks on real
endpoints (the embedded default; a relay and a configured endpoint; a bwrap
sandbox), their return codes, snippets, files, walltime kills and the
errors bad input gets in submit."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import cloudpickle
import psutil
import pytest

from fedexec import FederatedExecutor, ShellFunction, ShellResult, with_options
from fedexec.shell import TASK_DIR_ENV

from test_sandbox import bwrap, bwrap_federation, sandboxed_federation  # noqa: F401  (fixtures)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 60.0


class Launched(ShellFunction):
    """A subclass that prefixes a launcher, as MPIFunction does; its command
    is made in the worker only (it refuses to be made anywhere else)."""

    def command(self, kwargs):
        from fedexec.worker import process
        if process.current_task_id is None:
            raise RuntimeError("command() was called outside a worker")
        return "echo launcher: && " + super().command(kwargs)


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    """An embedded-default executor (2 workers) whose endpoint has a fedexec
    home of this module's own (where shell tasks leave their directories)."""
    home = tmp_path_factory.mktemp("shell") / "fedexec-home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDEXEC_HOME", str(home))
        mp.delenv(TASK_DIR_ENV, raising=False)
        with FederatedExecutor(max_workers=2) as ex:
            ex.home = str(home)
            yield ex


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if not _dead(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if not _dead(pid)]


# -- the embedded default -----------------------------------------------------------

@pytest.mark.timeout(120)
def test_return_codes_snippets_and_files(executor):
    result = executor.submit(ShellFunction("echo out {word}; echo err >&2; exit {code}"), word="x y",
                             code=3).result(DEADLINE)
    assert isinstance(result, ShellResult)
    assert result.cmd == "echo out x y; echo err >&2; exit 3"
    assert (result.returncode, result.stdout, result.stderr, result.timed_out) == (3, "out x y\n", "err\n", False)
    # the whole output stays in the task's own directory under the fedexec home, private
    assert os.path.dirname(result.task_dir) == os.path.join(executor.home, "tasks")
    assert stat.S_IMODE(os.stat(result.task_dir).st_mode) == 0o700
    with open(result.stdout_file) as f:
        assert f.read() == "out x y\n"
    assert stat.S_IMODE(os.stat(result.stderr_file).st_mode) == 0o600
    ok = executor.submit(ShellFunction("true")).result(DEADLINE)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    assert ok.task_dir != result.task_dir   # each task has a fresh directory
    # the command runs in it
    here = executor.submit(ShellFunction("pwd; touch made-here")).result(DEADLINE)
    assert here.stdout.strip() == here.task_dir and os.path.exists(os.path.join(here.task_dir, "made-here"))


@pytest.mark.timeout(120)
def test_check_true_raises_called_process_error_with_output(executor):
    future = executor.submit(ShellFunction("echo partial; echo broken >&2; exit 7", check=True))
    with pytest.raises(subprocess.CalledProcessError) as info:
        future.result(DEADLINE)
    error = info.value
    assert error.returncode == 7
    assert error.cmd == "echo partial; echo broken >&2; exit 7"
    assert error.output == error.stdout == "partial\n"
    assert error.stderr == "broken\n"
    # check=True and a zero exit: a value
    assert executor.submit(ShellFunction("echo fine", check=True)).result(DEADLINE).stdout == "fine\n"


@pytest.mark.timeout(120)
def test_snippets_are_the_last_lines_and_the_files_hold_everything(executor):
    result = executor.submit(ShellFunction("seq 1 {n}; seq 1 {n} >&2", snippet_lines=3), n=5000).result(DEADLINE)
    assert result.stdout == "4998\n4999\n5000\n"
    assert result.stderr == "4998\n4999\n5000\n"
    with open(result.stdout_file) as f:
        assert f.read() == "".join(f"{i}\n" for i in range(1, 5001))
    none = executor.submit(ShellFunction("seq 1 10", snippet_lines=0)).result(DEADLINE)
    assert none.stdout == "" and none.returncode == 0
    unended = executor.submit(ShellFunction("printf 'a\\nb\\nc'", snippet_lines=2)).result(DEADLINE)
    assert unended.stdout == "b\nc"


@pytest.mark.timeout(120)
def test_walltime_kills_the_process_tree_and_returns_124(executor):
    cmd = ("sleep 100 & echo $! > child; setsid sleep 100 & echo $! > escaped; "
           "sh -c 'sleep 100' & echo $! > grandparent; echo started; sleep 100")
    started = time.monotonic()
    result = executor.submit(ShellFunction(cmd, walltime=1.0)).result(DEADLINE)
    elapsed = time.monotonic() - started
    assert result.returncode == 124 and result.timed_out, result
    assert result.stdout == "started\n"
    assert elapsed < 20, f"the walltime of 1 s took {elapsed:.1f} s"
    pids = []
    for name in ("child", "escaped", "grandparent"):
        with open(os.path.join(result.task_dir, name)) as f:
            pids.append(int(f.read()))
    assert _wait_dead(pids) == [], f"processes of the command outlived its walltime: {pids}"
    with pytest.raises(subprocess.CalledProcessError) as info:
        executor.submit(ShellFunction("sleep 100", walltime=0.5, check=True)).result(DEADLINE)
    assert info.value.returncode == 124
    # the worker is fine afterwards
    assert executor.submit(ShellFunction("echo after")).result(DEADLINE).stdout == "after\n"


@pytest.mark.timeout(120)
def test_bad_input_fails_in_submit_naming_the_problem(executor):
    with pytest.raises(TypeError, match=r"needs a value for \{path\}: pass path="):
        executor.submit(ShellFunction("wc -l {path}"))
    with pytest.raises(TypeError, match=r"needs a value for \{path\}"):
        executor.submit(with_options(ShellFunction("wc -l {path}"), timeout=5), other=1)
    with pytest.raises(TypeError, match="keyword arguments only"):
        executor.submit(ShellFunction("wc -l {path}"), "/etc/hostname")
    with pytest.raises(TypeError, match="cannot fill"):
        executor.submit(ShellFunction("echo {values[3]}"), values=[1])
    with pytest.raises(TypeError, match="map cannot"):
        executor.map(ShellFunction("echo {x}"), [1, 2])
    with pytest.raises(TypeError, match="must be a str"):
        ShellFunction(["echo", "hi"])
    with pytest.raises(ValueError, match="walltime must be > 0"):
        ShellFunction("sleep 1", walltime=-1)
    with pytest.raises(ValueError, match="walltime must be > 0"):
        ShellFunction("sleep 1", walltime=0)
    with pytest.raises(ValueError, match="positional field"):
        ShellFunction("echo {}")
    with pytest.raises(ValueError, match="not a valid format string"):
        ShellFunction("echo {oops")
    with pytest.raises(ValueError, match="snippet_lines"):
        ShellFunction("true", snippet_lines=-1)
    # a literal brace is fine, and with_options passes a good call through
    assert executor.submit(with_options(ShellFunction("echo {{x}} {y}"), timeout=30),
                           y=1).result(DEADLINE).stdout == "{x} 1\n"


@pytest.mark.timeout(120)
def test_a_subclass_prefixes_the_command_in_the_worker(executor):
    result = executor.submit(Launched("echo {what}"), what="ran").result(DEADLINE)
    assert result.cmd == "echo launcher: && echo ran"
    assert result.stdout == "launcher:\nran\n"
    with pytest.raises(TypeError, match=r"needs a value for \{what\}"):   # submit checks the template alone
        executor.submit(Launched("echo {what}"))


@pytest.mark.timeout(120)
def test_concurrent_shell_tasks_keep_their_own_output(executor):
    futures = [executor.submit(ShellFunction("for i in 1 2 3; do echo {tag}-$i; sleep 0.05; done"), tag=f"t{n}")
               for n in range(6)]
    for n, future in enumerate(futures):
        result = future.result(DEADLINE)
        assert result.stdout == "".join(f"t{n}-{i}\n" for i in (1, 2, 3)), result
    assert len({f.result().task_dir for f in futures}) == len(futures)


# -- a relay and a configured endpoint ------------------------------------------------------

@pytest.mark.timeout(180)
def test_shell_task_on_a_configured_endpoint_uses_its_task_dir(tmp_path):
    place = tmp_path / "endpoint-tasks"
    with sandboxed_federation(tmp_path, "none", env={TASK_DIR_ENV: str(place)}) as federation:
        with FederatedExecutor(federation.config.endpoint_id, relay=federation.address) as ex:
            result = ex.submit(ShellFunction("echo remote {n}; exit 2"), n=1).result(DEADLINE)
            future = ex.submit(ShellFunction("sleep 100 & echo $! > child; sleep 100", walltime=0.5))
            killed = future.result(DEADLINE)
    assert (result.returncode, result.stdout) == (2, "remote 1\n")
    assert os.path.dirname(result.task_dir) == str(place)
    assert result.task_dir.split("/")[-1].startswith(ex_task_prefix(result))
    assert stat.S_IMODE(os.stat(place).st_mode) == 0o700
    assert killed.returncode == 124
    with open(os.path.join(killed.task_dir, "child")) as f:
        assert _wait_dead([int(f.read())]) == []


def ex_task_prefix(result: ShellResult) -> str:
    """A task directory is named after its task id (32 hex digits) then a dash."""
    name = os.path.basename(result.task_dir)
    head = name.split("-", 1)[0]
    assert len(head) == 32 and int(head, 16) >= 0, name
    return head


# -- the bwrap sandbox ---------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_shell_task_in_the_bwrap_sandbox(bwrap_federation):
    ex = bwrap_federation.executor
    result = ex.submit(ShellFunction("pwd; echo hi > made; ls; echo to-err >&2; exit 4")).result(DEADLINE)
    assert result.returncode == 4
    cwd, listing = result.stdout.splitlines()[0], result.stdout.splitlines()[1:]
    assert "made" in listing and "stdout" in listing, result.stdout
    assert result.stderr == "to-err\n"
    # the whole output is kept on the host, where the endpoint says: in the directory of that
    # sandboxed worker's own under the endpoint's task base, bound into its sandbox (at /task-kept)
    base = str(bwrap_federation.directory / "fedexec-home" / "tasks")
    assert cwd.startswith("/task-kept/") and os.path.basename(cwd) == os.path.basename(result.task_dir), cwd
    worker_dir = os.path.dirname(result.task_dir)
    assert os.path.dirname(worker_dir) == base and os.path.basename(worker_dir).startswith("sandbox-")
    with open(result.stdout_file) as out, open(result.stderr_file) as err:
        assert out.read() == result.stdout and err.read() == "to-err\n"
    with open(os.path.join(result.task_dir, "made")) as made:
        assert made.read() == "hi\n"
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (worker_dir, result.task_dir, result.stdout_file)] \
        == [0o700, 0o700, 0o600]
    # a sandboxed task sees its own worker's directory of the base, no other worker's
    for _ in range(6):
        look = ex.submit(ShellFunction("ls -d {base} {dir}; ls /task-kept"), base=base,
                         dir=worker_dir).result(DEADLINE)
        # the base (the fedexec home) is not in view at all, nor another worker's directory
        assert "No such file" in look.stderr and base not in look.stdout, look
        assert os.path.basename(look.task_dir) in look.stdout.split(), look
        assert set(look.stdout.split()) <= set(os.listdir(os.path.dirname(look.task_dir))), look
    others = {n for n in os.listdir(base) if n.startswith("sandbox-")}
    assert len(others) >= 2, others   # (the two workers' directories, of which each sees one)
    # the sandbox has no network and a read-only host, as for Python tasks
    denied = ex.submit(ShellFunction("echo x > /usr/fedexec-shell-escape")).result(DEADLINE)
    assert denied.returncode != 0 and "Read-only" in denied.stderr, denied
    started = time.monotonic()
    slow = ex.submit(ShellFunction("sleep 100 & sleep 100", walltime=1.0)).result(DEADLINE)
    assert slow.returncode == 124 and time.monotonic() - started < 20
    for root in bwrap_federation.task_roots():   # nothing left in the sandboxes' task roots
        assert list(root.iterdir()) == [], list(root.iterdir())
