"""Shell task directories (issue 14, leftovers of item 1): made with ``*at``
calls under a checked base that follow no planted symlink, private, and
removed by the endpoint once they expire (``task_dir_ttl``), never following
a link out of the base. The cleaner's rules are tested on real directories
in this process (with a ``now`` of the test's choosing); the rest through a
relay and a configured endpoint."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedexec import FederatedExecutor, ShellFunction
from fedexec.config import EndpointConfig
from fedexec.taskdirs import (MAX_DEPTH, REMOVING_PREFIX, SANDBOX_PREFIX, TASK_DIR_ENV, TaskDirCleaner,
                              TaskDirError, make_task_dir, open_base)

from test_sandbox import sandboxed_federation

DEADLINE = 60.0
HOUR = 3600.0
TASK = "ab" * 16   # a task id's hex, as task directories are named after it


def _task_dir(base: Path, suffix: str = "0000000a", age: float = 0.0) -> Path:
    """A task directory as a shell task leaves it (stdout, stderr), last changed ``age`` seconds ago."""
    path = base / f"{TASK}-{suffix}"
    path.mkdir(mode=0o700)
    for name in ("stdout", "stderr"):
        (path / name).write_text(name)
    _age(path, age, "stdout", "stderr")
    return path


def _age(path: Path, age: float, *names: str) -> None:
    when = time.time() - age
    for name in names:
        os.utime(path / name, (when, when), follow_symlinks=False)
    os.utime(path, (when, when), follow_symlinks=False)


def _outside(tmp_path: Path) -> Path:
    """A directory outside the base with a file that must survive every cleaning."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    return outside


# -- the cleaner's rules, on real directories ---------------------------------------------------

def test_only_expired_task_directories_go_and_links_out_of_the_base_are_not_followed(tmp_path):
    base = tmp_path / "tasks"
    base.mkdir(mode=0o700)
    outside = _outside(tmp_path)
    old = _task_dir(base, "0000000a")
    (old / "link-out").symlink_to(outside)                  # a task replaced files by links to elsewhere
    (old / "stdout").unlink()
    (old / "stdout").symlink_to(outside / "precious")
    locked = old / "locked"
    locked.mkdir()
    (locked / "inner").write_text("x")
    locked.chmod(0)                                          # a directory the task made unreadable
    _age(old, 2 * HOUR, "stdout", "stderr")
    planted = base / f"{TASK}-0000000b"                      # a link named as a task directory
    planted.symlink_to(outside)
    os.utime(planted, (time.time() - 2 * HOUR,) * 2, follow_symlinks=False)
    fresh = _task_dir(base, "0000000c")
    writing = _task_dir(base, "0000000d", age=2 * HOUR)     # a command still writing its output
    os.utime(writing / "stdout")
    foreign = base / "notes-of-the-user"                     # not a name fedexec gives: never touched
    foreign.mkdir()
    _age(foreign, 2 * HOUR)

    TaskDirCleaner(str(base), ttl=HOUR).clean_once()
    assert sorted(p.name for p in base.iterdir()) == sorted([fresh.name, writing.name, foreign.name])
    assert (outside / "precious").read_text() == "keep me" and sorted(os.listdir(outside)) == ["precious"]


@pytest.mark.timeout(60)
def test_pools_sharing_a_base_read_it_once_an_interval_not_once_each(tmp_path):
    """Every embedded default of a user shares one base, which may hold tens
    of thousands of directories: a pool skips its pass while another's whole
    pass is younger than its interval (the base's .cleaned file)."""
    base = tmp_path / "tasks"
    base.mkdir(mode=0o700)
    olds = [_task_dir(base, f"0000000{i}", age=HOUR) for i in range(3)]
    first = TaskDirCleaner(str(base), ttl=2.0).start()        # a pass every 0.5 s
    try:
        deadline = time.monotonic() + 20
        while any(p.exists() for p in olds) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(p.exists() for p in olds)
        mark = base / ".cleaned"
        deadline = time.monotonic() + 10
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = mark.lstat()
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    finally:
        first.stop()
    olds = [_task_dir(base, f"0000001{i}", age=HOUR) for i in range(3)]
    second = TaskDirCleaner(str(base), ttl=8.0).start()       # a pass every 2 s, skipped while marked
    try:
        until = time.monotonic() + 5.0
        while time.monotonic() < until:                        # another pool's passes, every 0.2 s
            os.utime(mark)
            time.sleep(0.2)
        assert all(p.exists() for p in olds)
        deadline = time.monotonic() + 20                       # no one else: its own pass comes
        while any(p.exists() for p in olds) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(p.exists() for p in olds)
    finally:
        second.stop()


def test_a_pass_is_bounded_and_the_next_ones_finish_even_a_deep_tree(tmp_path):
    base = tmp_path / "tasks"
    base.mkdir(mode=0o700)
    wide = _task_dir(base, "0000000a")
    for i in range(50):
        (wide / f"f{i}").write_text("x")
    deep = _task_dir(base, "0000000b")
    level = deep
    for _ in range(MAX_DEPTH * 2 + 5):                       # deeper than the descriptors held open at once
        level = level / "d"
        level.mkdir()
    (level / "bottom").write_text("x")
    _age(wide, 2 * HOUR, "stdout", "stderr")
    _age(deep, 2 * HOUR, "stdout", "stderr")
    cleaner = TaskDirCleaner(str(base), ttl=HOUR, budget=20)
    assert cleaner.clean_once() == 20
    # what a pass did not finish is out of sight at once (renamed), and goes on in the next passes
    names = [p.name for p in base.iterdir()]
    assert any(n.startswith(REMOVING_PREFIX) for n in names) and not (wide.name in names and deep.name in names)
    passes = 1
    while list(base.iterdir()):
        assert cleaner.clean_once() <= 20
        passes += 1
        assert passes < 100, list(base.iterdir())
    assert passes > 5


def test_a_live_sandboxed_workers_directory_is_kept_whole_but_its_expired_tasks_go(tmp_path):
    base = tmp_path / "tasks"
    base.mkdir(mode=0o700)
    live = base / f"{SANDBOX_PREFIX}{'1' * 16}"
    gone = base / f"{SANDBOX_PREFIX}{'2' * 16}"
    for worker_dir in (live, gone):
        worker_dir.mkdir(mode=0o700)
        _task_dir(worker_dir, "0000000a", age=2 * HOUR)
    _task_dir(live, "0000000b")
    _age(live, 2 * HOUR)
    _age(gone, 2 * HOUR)
    TaskDirCleaner(str(base), ttl=HOUR, live=lambda: {live.name}).clean_once()
    assert [p.name for p in base.iterdir()] == [live.name]
    assert [p.name for p in live.iterdir()] == [f"{TASK}-0000000b"]


def test_the_base_is_refused_when_a_link_or_not_private_and_task_dirs_are_private(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(TaskDirError, match="is a symlink"):
        open_base(str(link))
    open_writable = tmp_path / "open"
    open_writable.mkdir()
    open_writable.chmod(0o777)
    with pytest.raises(TaskDirError, match="writable by others"):
        open_base(str(open_writable))
    if os.geteuid() == 0:   # (only root can give a directory away)
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(TaskDirError, match="belongs to uid 65534"):
            open_base(str(foreign))
    made = tmp_path / "made" / "tasks"                 # missing: made, private
    path, fd = make_task_dir(str(made), bytes.fromhex(TASK))
    os.close(fd)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700 and stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert os.path.basename(path).startswith(TASK + "-") and os.listdir(real) == []


def _attributes(path: Path) -> str:
    """The ext2/3/4 attribute letters of ``path`` (``lsattr -d``: e2fsprogs)."""
    done = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"lsattr cannot read {path}'s attributes: {done.stderr.strip()}"
    return done.stdout.split()[0]


@pytest.mark.timeout(120)
def test_a_base_fedexec_makes_spreads_its_task_directories_and_one_the_user_made_is_left_alone(
        tmp_path, monkeypatch):
    """A base fedexec makes is marked (ext4's top-directory flag) so that its
    task directories go to block groups of the file system's choosing, not
    all to the base's group, where thousands just removed made every new one
    cost ~2 ms (taskdirs.spread_subdirectories); its task directories are
    not marked, nor is a base the user made."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    assert kind == "ext2/ext3", f"this test needs its temporary directory on ext2/3/4, not {kind!r}"
    made, mine = tmp_path / "made" / "tasks", tmp_path / "mine"
    mine.mkdir(mode=0o700)
    for base in (made, mine):
        monkeypatch.setenv(TASK_DIR_ENV, str(base))
        with FederatedExecutor(max_workers=1) as ex:
            ran = [ex.submit(ShellFunction("pwd")).result(DEADLINE) for _ in range(2)]
        for result in ran:
            assert result.returncode == 0 and result.stdout.strip() == result.task_dir, result
            assert Path(result.task_dir).parent == base and "T" not in _attributes(Path(result.task_dir))
    assert "T" in _attributes(made), _attributes(made)
    assert "T" not in _attributes(mine), _attributes(mine)


# -- through a relay and an endpoint -----------------------------------------------------------

@pytest.mark.timeout(180)
def test_a_symlink_planted_for_the_base_is_not_followed_by_the_next_task(tmp_path):
    place = tmp_path / "endpoint-tasks"
    outside = _outside(tmp_path)
    with sandboxed_federation(tmp_path, "none", env={TASK_DIR_ENV: str(place)}) as federation:
        with FederatedExecutor(federation.config.endpoint_id, relay=federation.address) as ex:
            # a task replaces the base it runs under by a link to a directory of its choosing
            plant = ex.submit(ShellFunction("mv {base} {base}.old && ln -s {to} {base}"), base=str(place),
                              to=str(outside)).result(DEADLINE)
            assert plant.returncode == 0, plant.stderr
            with pytest.raises(TaskDirError, match="is a symlink"):
                ex.submit(ShellFunction("echo into the link > planted")).result(DEADLINE)
            assert sorted(os.listdir(outside)) == ["precious"]
            # a base others may write into is refused too
            os.unlink(place)
            os.rename(f"{place}.old", place)
            place.chmod(0o777)
            with pytest.raises(TaskDirError, match="writable by others"):
                ex.submit(ShellFunction("true")).result(DEADLINE)
            place.chmod(0o700)
            assert ex.submit(ShellFunction("true")).result(DEADLINE).returncode == 0


@pytest.mark.timeout(180)
def test_the_endpoint_removes_expired_task_directories_and_nothing_outside(tmp_path):
    place = tmp_path / "endpoint-tasks"
    outside = _outside(tmp_path)
    place.mkdir(mode=0o700)
    foreign = place / "results-the-user-keeps.txt"
    foreign.write_text("mine")
    os.utime(foreign, (time.time() - 2 * HOUR,) * 2)
    ttl = 2.0
    with sandboxed_federation(tmp_path, "none", env={TASK_DIR_ENV: str(place)}, task_dir_ttl=ttl) as federation:
        with FederatedExecutor(federation.config.endpoint_id, relay=federation.address) as ex:
            result = ex.submit(ShellFunction("echo out; ln -s {to} link-out; mkdir -p a/b/c; touch a/b/c/f; "
                                             "chmod 000 a/b"), to=str(outside)).result(DEADLINE)
            assert result.returncode == 0 and os.path.isdir(result.task_dir), result.stderr
            made = time.monotonic()
            deadline = made + 30
            while os.path.lexists(result.task_dir) and time.monotonic() < deadline:
                time.sleep(0.1)
            gone_after = time.monotonic() - made
            assert not os.path.lexists(result.task_dir), "the expired task directory was not removed"
            assert gone_after >= ttl - 0.5, gone_after   # not before its time
            # a later task still gets a directory there, and the user's own file stays
            assert ex.submit(ShellFunction("true")).result(DEADLINE).returncode == 0
    assert foreign.read_text() == "mine"
    assert sorted(os.listdir(outside)) == ["precious"] and (outside / "precious").read_text() == "keep me"


def test_configure_takes_task_dir_ttl_and_refuses_a_bad_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "configure", "t", "--task-dir-ttl", "60"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert EndpointConfig.load("t").task_dir_ttl == 60
    assert EndpointConfig(name="d").task_dir_ttl == 7 * 24 * 3600
    bad = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "configure", "t", "--task-dir-ttl", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "task_dir_ttl must be a number of seconds >= 0" in bad.stderr, bad.stderr


def test_a_running_quiet_task_and_a_held_directory_are_kept_however_old(tmp_path):
    """A shell task that writes nothing for longer than the TTL keeps its
    directory while it runs (it holds it: taskdirs.hold), as does a pool its
    live sandboxed workers' directories, whichever cleaner sharing the base
    looks; once the task is done and the hold gone, the same pass removes it."""
    import fcntl
    place = tmp_path / "endpoint-tasks"
    with sandboxed_federation(tmp_path, "none", env={TASK_DIR_ENV: str(place)}) as federation:
        with FederatedExecutor(federation.config.endpoint_id, relay=federation.address) as ex:
            quiet = ex.submit(ShellFunction("sleep 4; echo done > result.dat; cat result.dat"))
            deadline = time.monotonic() + DEADLINE
            while not (place.is_dir() and any(p.is_dir() for p in place.iterdir()) and quiet.running()):
                assert time.monotonic() < deadline, "the task made no directory"
                time.sleep(0.05)
            # (and its worker's spare for the next task, made as it starts, is made and held: the pass
            # below, with a clock 30 h ahead, would take one caught between its mkdir and its flock)
            time.sleep(0.5)
            # another cleaner (another pool or endpoint sharing the base) sees it as long expired
            assert TaskDirCleaner(str(place), ttl=HOUR).clean_once(now=time.time() + 30 * HOUR) == 0
            result = quiet.result(DEADLINE)
            assert result.returncode == 0 and result.stdout.strip() == "done", result
            assert Path(result.stdout_file).parent.is_dir()
            assert TaskDirCleaner(str(place), ttl=HOUR).clean_once(now=time.time() + 30 * HOUR) > 0
            assert not Path(result.stdout_file).parent.exists()
    # a sandboxed worker's directory its pool holds open (a descriptor with the shared lock) stays whole
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    held = base / f"{SANDBOX_PREFIX}{'0' * 16}"
    held.mkdir(mode=0o700)
    _age(held, 30 * HOUR)
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        TaskDirCleaner(str(base), ttl=HOUR).clean_once()
        assert held.is_dir()
    finally:
        os.close(fd)
    TaskDirCleaner(str(base), ttl=HOUR).clean_once()
    assert not held.exists()
