"""A shell task's directory made ahead of time while its worker is idle
(spare_taskdir.py): the next shell task takes it under its own name, with
the same modes and an empty output; a spare that does not fit (another base,
a base swapped or made unsafe, too old) is never used; the cleaner leaves a
held spare alone; a stopping worker removes its spare."""

from __future__ import annotations

import os
import stat
import time
import uuid

import pytest

from fedexec import FederatedExecutor, ShellFunction
from fedexec import spare_taskdir
from fedexec.spare_taskdir import SPARE_PREFIX, SpareTaskDir
from fedexec.taskdirs import TASK_DIR_ENV, TaskDirCleaner, TaskDirError, make_task_dir

DEADLINE = 60.0
TASK = bytes(range(16))


def _spares(base: str) -> list[str]:
    return sorted(n for n in os.listdir(base) if n.startswith(SPARE_PREFIX)) if os.path.isdir(base) else []


def _wait_spare(base: str, timeout: float = 20.0) -> str:
    """The name of the one spare in ``base`` once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _spares(base)
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no spare task directory appeared in {base} within {timeout:g} s: {os.listdir(base)}")


def _made(path) -> str:
    """``path`` made as a task base (0700), as the first shell task there makes it."""
    os.mkdir(path, 0o700)
    return str(path)


def _closed(taken: tuple[str, int, int, int]) -> str:
    for fd in taken[1:]:
        os.close(fd)
    return taken[0]


@pytest.mark.timeout(120)
def test_the_next_shell_task_takes_the_directory_made_while_idle(tmp_path, monkeypatch):
    base = str(tmp_path / "tasks")
    monkeypatch.setenv(TASK_DIR_ENV, base)
    with FederatedExecutor(max_workers=1) as ex:
        first = ex.submit(ShellFunction("echo first")).result(DEADLINE)
        assert first.stdout == "first\n"
        spare = _wait_spare(base)   # made by the idle worker after the task
        assert stat.S_IMODE(os.stat(os.path.join(base, spare)).st_mode) == 0o700
        assert sorted(os.listdir(os.path.join(base, spare))) == ["stderr", "stdout"]
        future = ex.submit(ShellFunction("pwd; echo out; echo err >&2; ls"))
        second = future.result(DEADLINE)
        # renamed to the task's own name (its id, then the spare's random part), and used as a fresh one
        assert os.path.basename(second.task_dir) == uuid.UUID(future.task_id).hex + spare[len(SPARE_PREFIX) - 1:]
        assert second.stdout.splitlines() == [second.task_dir, "out", "stderr", "stdout"]
        assert second.stderr == "err\n"
        with open(second.stdout_file) as out, open(second.stderr_file) as err:
            assert (out.read(), err.read()) == (second.stdout, "err\n")
        assert [stat.S_IMODE(os.stat(p).st_mode) for p in (second.task_dir, second.stdout_file,
                                                           second.stderr_file)] == [0o700, 0o600, 0o600]
        assert not os.path.exists(os.path.join(base, spare))
        again = _wait_spare(base)   # and the next one is made
        assert again != spare
    # the stopped worker removed its spare; the tasks' directories stay
    assert _spares(base) == []
    assert {first.task_dir, second.task_dir} <= {os.path.join(base, n) for n in os.listdir(base)}


def test_a_spare_is_used_only_in_its_own_base(tmp_path):
    one, other = _made(tmp_path / "one"), _made(tmp_path / "other")
    spares = SpareTaskDir()
    assert spares.take(one, TASK) is None and spares.wanted == one   # none yet: the caller makes one
    spares.refill()
    made = _spares(one)
    assert len(made) == 1 and spares.wanted is None
    assert spares.take(other, TASK) is None   # asked elsewhere: removed, not used
    assert _spares(one) == [] and os.listdir(one) == []
    spares.refill()   # (now wanted in the other base)
    path = _closed(spares.take(other, TASK))
    assert os.path.dirname(path) == other and os.path.basename(path).startswith(TASK.hex() + "-")
    assert sorted(os.listdir(path)) == ["stderr", "stdout"]


def test_a_spare_in_a_swapped_or_unsafe_base_is_not_used(tmp_path):
    base = _made(tmp_path / "tasks")
    spares = SpareTaskDir()
    spares.take(base, TASK)
    spares.refill()
    assert len(_spares(base)) == 1
    os.rename(base, str(tmp_path / "moved"))   # another directory put where the base was
    os.mkdir(base, 0o700)
    assert spares.take(base, TASK) is None
    assert os.listdir(base) == [] and os.listdir(tmp_path / "moved") == []   # (the old spare removed)
    spares.refill()
    assert len(_spares(base)) == 1
    os.chmod(base, 0o777)   # made writable by others: refused, as a fresh directory would be
    assert spares.take(base, TASK) is None
    with pytest.raises(TaskDirError, match="writable by others"):
        make_task_dir(base, TASK)
    assert _spares(base) == []


def test_an_old_spare_is_made_again(tmp_path, monkeypatch):
    base = _made(tmp_path / "tasks")
    spares = SpareTaskDir()
    spares.take(base, TASK)
    spares.refill()
    assert len(_spares(base)) == 1
    monkeypatch.setattr(spare_taskdir, "SPARE_MAX_AGE", 0.0)   # (its times would be too old for the TTL)
    assert spares.take(base, TASK) is None
    assert _spares(base) == []


def test_the_cleaner_leaves_a_held_spare_alone_and_discard_removes_it(tmp_path):
    base = _made(tmp_path / "tasks")
    spares = SpareTaskDir()
    spares.take(base, TASK)
    spares.refill()
    [name] = _spares(base)
    TaskDirCleaner(base, ttl=1.0).clean_once(now=time.time() + 10 ** 6)   # long expired, but held
    assert _spares(base) == [name]
    spares.discard()
    assert os.listdir(base) == []
    assert spares.take(base, None) is None   # (a call outside a task: named "task-...", not renamed)
    spares.refill()
    path = _closed(spares.take(base, None))
    assert os.path.basename(path).startswith(SPARE_PREFIX)


def test_no_spare_where_the_base_cannot_be_used(tmp_path):
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    spares = SpareTaskDir()
    spares.take(str(link), TASK)
    spares.refill()   # (fails quietly: the task's own attempt says why)
    assert spares.take(str(link), TASK) is None and os.listdir(target) == []
    with pytest.raises(TaskDirError, match="symlink"):
        make_task_dir(str(link), TASK)


def test_no_spare_where_the_base_was_removed(tmp_path):
    base = tmp_path / "tasks"
    _made(base)
    spares = SpareTaskDir()
    spares.take(str(base), TASK)
    spares.refill()
    _closed(spares.take(str(base), TASK))   # (taken: the next one wanted)
    for leftover in base.iterdir():
        for name in os.listdir(leftover):
            os.unlink(leftover / name)
        leftover.rmdir()
    base.rmdir()   # the user removed the base meanwhile: an idle worker does not make it again
    spares.refill()
    assert not base.exists()


@pytest.mark.timeout(120)
def test_the_next_spare_is_made_while_the_command_runs(tmp_path, monkeypatch):
    """Made by the worker's maker thread once the command started, not after
    it ended: a task that comes meanwhile does not wait for the file system."""
    base = str(tmp_path / "tasks")
    monkeypatch.setenv(TASK_DIR_ENV, base)
    with FederatedExecutor(max_workers=1) as ex:
        ex.submit(ShellFunction("true")).result(DEADLINE)
        first = _wait_spare(base)
        marker = tmp_path / "started"
        running = ex.submit(ShellFunction("touch {marker}; sleep 3; echo done"), marker=str(marker))
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert marker.exists(), "the command did not start"
        during = _wait_spare(base, timeout=2.0)   # while `sleep 3` runs
        assert during != first and not running.done()
        assert running.result(DEADLINE).stdout == "done\n"
        after = ex.submit(ShellFunction("pwd")).result(DEADLINE)
        assert os.path.basename(after.task_dir).endswith(during[len(SPARE_PREFIX) - 1:])   # the one made


def test_a_program_calling_a_shell_function_itself_is_left_no_spare(tmp_path, monkeypatch):
    base = str(tmp_path / "tasks")
    monkeypatch.setenv(TASK_DIR_ENV, base)
    result = ShellFunction("echo here")()
    assert result.stdout == "here\n"
    time.sleep(0.2)
    assert os.listdir(base) == [os.path.basename(result.task_dir)]   # its own only (named task-<random>)
