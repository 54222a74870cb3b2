"""Parsl apps on fedexec endpoints (issue 16, item 2): a Parsl workflow with
dependencies, retries, a bash_app and resource specifications runs on
``fedexec.parsl.FederatedParslExecutor`` over the embedded default (a real
relay, endpoint and worker processes)."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest

from conftest import workers_of

try:
    import parsl
    from parsl import bash_app, python_app
    from parsl.executors.errors import InvalidResourceSpecification
except ImportError as exc:   # a test that cannot run here fails saying why
    raise ImportError(f"Parsl is not installed ({exc}): pip install -e '.[test]'") from exc

from fedexec.parsl import FederatedParslExecutor, task_options

from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay

# tests/ is not importable on the workers: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@python_app(executors=["fedexec"])
def make(n):
    import os
    return list(range(n)), os.getpid()


@python_app(executors=["fedexec"])
def total(made):
    values, _ = made
    return sum(values)


@python_app(executors=["fedexec"])
def combine(*parts):
    return sum(parts)


@python_app(executors=["fedexec"])
def flaky(marker):
    """Fails on its first two tries (counted in a file), then succeeds."""
    import os
    with open(marker, "a") as f:
        f.write("try\n")
    with open(marker) as f:
        tries = len(f.readlines())
    if tries < 3:
        raise RuntimeError(f"try {tries} fails")
    return tries, os.getpid()


@python_app(executors=["fedexec"])
def always_fails():
    raise KeyError("never works")


@bash_app(executors=["fedexec"])
def shout(word, stdout=None, stderr=None):
    return f"echo {word} | tr a-z A-Z; echo pid $$; echo to-stderr >&2"


@bash_app(executors=["fedexec"])
def exit_code(code):
    return f"exit {code}"


@python_app(executors=["fedexec"])
def cores_seen(parsl_resource_specification=None):
    import os
    return os.getpid()


@python_app(executors=["remote"])
def where(x):
    import os
    return x * 2, os.environ.get("FEDEXEC_HOME", "")


@bash_app(executors=["remote"])
def remote_echo(word, stdout=None):
    return f"echo {word} from $FEDEXEC_HOME"


@pytest.fixture(scope="module")
def dfk(tmp_path_factory):
    """Parsl loaded with the fedexec executor (embedded default, 2 workers) and 2 retries."""
    run_dir = tmp_path_factory.mktemp("parsl-runinfo")
    config = parsl.Config(executors=[FederatedParslExecutor(label="fedexec", max_workers=2)],
                          retries=2, run_dir=str(run_dir), strategy="none")
    kernel = parsl.load(config)
    try:
        yield kernel
    finally:
        kernel.cleanup()


def fedexec_workers() -> set[int]:
    """The pids of the embedded endpoint's workers (children of this process)."""
    return {proc.pid for proc in workers_of(os.getpid())}


def test_workflow_with_dependencies_runs_on_fedexec_workers(dfk):
    made = [make(n) for n in (3, 4, 5)]
    sums = [total(m) for m in made]               # each waits for its make()
    grand = combine(*sums)                         # fan in
    assert grand.result(timeout=60) == 3 + 6 + 10
    pids = {m.result()[1] for m in made}
    assert os.getpid() not in pids
    assert pids <= fedexec_workers(), "the apps did not run on the embedded endpoint's workers"
    # Parsl's task record names our executor and the fedexec task id of the try
    record = grand.task_record
    assert record["executor"] == "fedexec"
    assert len(record["exec_fu"].parsl_executor_task_id) == 36


def test_retries_rerun_a_failed_app(dfk, tmp_path):
    marker = tmp_path / "tries"
    tries, pid = flaky(str(marker)).result(timeout=60)
    assert tries == 3 and pid in fedexec_workers()
    failing = always_fails()
    with pytest.raises(KeyError, match="never works"):
        failing.result(timeout=60)
    assert failing.task_record["fail_count"] == 3   # the first try and 2 retries


def test_bash_app_runs_through_parsls_wrapper(dfk, tmp_path):
    out, err = tmp_path / "shout.out", tmp_path / "shout.err"
    assert shout("hello", stdout=str(out), stderr=str(err)).result(timeout=60) == 0
    lines = out.read_text().split()
    assert lines[0] == "HELLO"
    assert int(lines[2]) != os.getpid()
    assert err.read_text().strip().endswith("to-stderr")   # (after Parsl's note of the command)
    from parsl.app.errors import BashExitFailure
    with pytest.raises(BashExitFailure) as failure:
        exit_code(3).result(timeout=60)
    assert failure.value.exitcode == 3


def test_resource_specification_travels(dfk):
    pid = cores_seen(parsl_resource_specification={"cores": 1, "memory": 64}).result(timeout=60)
    assert pid in fedexec_workers()
    # a node cannot give what it does not have: the endpoint rejects it, naming the shortfall
    with pytest.raises(Exception, match="cores"):
        cores_seen(parsl_resource_specification={"cores": 4096}).result(timeout=60)
    with pytest.raises(InvalidResourceSpecification, match="priority"):
        cores_seen(parsl_resource_specification={"priority": 1}).result(timeout=60)


def test_task_options_read_parsl_spellings():
    assert task_options(None) == {} and task_options({}) == {}
    assert task_options({"cores": 2, "memory": 100, "running_time_min": 2}) == {
        "resources": {"cores": 2, "memory": 100 << 20}, "timeout": 120}
    assert task_options({"num_nodes": 2, "ranks_per_node": 4}) == {
        "resources": {"num_nodes": 2, "ranks_per_node": 4}}
    assert task_options({"memory": "4G"}) == {"resources": {"memory": "4G"}}
    with pytest.raises(InvalidResourceSpecification, match="running_time_min"):
        task_options({"running_time_min": 0})
    with pytest.raises(InvalidResourceSpecification, match="disk"):
        task_options({"disk": 10})


def test_executor_without_start_says_so():
    executor = FederatedParslExecutor(label="unstarted")
    with pytest.raises(RuntimeError, match="was not started"):
        executor.submit(abs, {}, -1)
    with pytest.raises(ValueError, match="label"):
        FederatedParslExecutor(label="")


@pytest.mark.timeout(180)
def test_apps_on_an_endpoint_through_its_relay(dfk, tmp_path):
    """An endpoint process of its own behind a token relay: FederatedParslExecutor(endpoint_id, relay=, token=)."""
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data).stdout.strip()
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "parsl-ep", {"FEDEXEC_TOKEN": token}, relay=address) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            remote = FederatedParslExecutor(ep.id, label="remote", relay=address, token=token)
            dfk.add_executors([remote])
            try:
                doubled = [where(i) for i in range(4)]
                assert [d.result(timeout=60)[0] for d in doubled] == [0, 2, 4, 6]
                # they ran under the endpoint's own home, not this test's
                assert {d.result()[1] for d in doubled} == {str(ep.home)}
                out = tmp_path / "echo.out"
                assert remote_echo("hi", stdout=str(out)).result(timeout=60) == 0
                assert out.read_text().strip() == f"hi from {ep.home}"
            finally:
                remote.shutdown()   # before its relay stops (Parsl's cleanup calls it again: a no-op)
