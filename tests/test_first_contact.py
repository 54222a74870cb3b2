"""First contact (issue 16, item 5): each common first mistake ends at once,
or within a few seconds, with an error that names the problem and the fix;
every error fedexec raises is a FedexecError exported from ``fedexec``.

Each case asserts its time bound. Relays and endpoints are real processes
on loopback (test_faults.py's helpers).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

import fedexec
from fedexec import (ConfigError, EndpointNotConnected, EndpointNotConnectedWarning, FederatedExecutor,
                     FedexecError, RelayUnavailable, UnknownEndpoint)
from test_faults import dispatcher_threads, free_port, running_relay, stop_process
from test_providers import configured_endpoint


def pid_of_worker():
    return os.getpid()


def endpoint_process(tmp_path: Path, name: str, relay: str, endpoint_id: str | None = None):
    """``fedexec endpoint`` configured as ``name`` in this test's fedexec home, run as a subprocess."""
    return configured_endpoint(tmp_path, relay, name=name, endpoint_id=endpoint_id)


@contextlib.contextmanager
def within(seconds: float, what: str):
    """Assert that the block took at most ``seconds``."""
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    assert took <= seconds, f"{what} took {took:.2f} s (bound: {seconds} s)"


# -- 1. a relay address without a scheme -----------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("address", ["127.0.0.1:55700", "localhost:55700", "tcp://127.0.0.1", "tcp://*:55700",
                                     "tcp://127.0.0.1:99999", "http://127.0.0.1:55700", ""])
def test_a_relay_address_of_the_wrong_form_is_a_value_error_at_once(address):
    threads = dispatcher_threads()
    with within(1.0, "the error for a malformed relay address"):
        with pytest.raises(ValueError) as info:
            FederatedExecutor(str(uuid.uuid4()), relay=address)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, FedexecError)
    assert "tcp://HOST:PORT" in str(info.value) and repr(address) in str(info.value)
    if address.endswith(":55700") and "://" not in address:
        assert f"did you mean 'tcp://{address}'" in str(info.value)
    assert dispatcher_threads() == threads


@pytest.mark.timeout(30)
def test_a_malformed_fedexec_relay_variable_is_named(monkeypatch):
    monkeypatch.setenv("FEDEXEC_RELAY", "127.0.0.1:55700")
    with within(1.0, "the error for a malformed $FEDEXEC_RELAY"):
        with pytest.raises(ConfigError, match=r"\$FEDEXEC_RELAY '127.0.0.1:55700' is not a relay address"):
            FederatedExecutor(str(uuid.uuid4()))


# -- 2. nothing listening at the relay's address ---------------------------------------------

@pytest.mark.timeout(30)
def test_nothing_listening_on_tcp_is_relay_unavailable_within_3_s():
    threads = dispatcher_threads()
    address = f"tcp://127.0.0.1:{free_port()}"   # nothing listens there
    with within(3.0, "RelayUnavailable with the default connect_timeout (30 s)"):
        with pytest.raises(RelayUnavailable) as info:
            FederatedExecutor(str(uuid.uuid4()), relay=address)
    message = str(info.value)
    assert f"nothing listens at the relay address {address}" in message and "fedexec relay start" in message
    assert dispatcher_threads() == threads


@pytest.mark.timeout(30)
def test_nothing_listening_on_ipc_is_relay_unavailable_within_3_s(tmp_path):
    address = f"ipc://{tmp_path}/no-relay.sock"
    with within(3.0, "RelayUnavailable for a missing ipc socket"):
        with pytest.raises(RelayUnavailable, match="no socket file"):
            FederatedExecutor(str(uuid.uuid4()), relay=address)


@pytest.mark.timeout(30)
def test_an_unknown_relay_host_is_relay_unavailable_at_once():
    with within(3.0, "RelayUnavailable for a host that does not resolve"):
        with pytest.raises(RelayUnavailable, match="names a host that cannot be found"):
            FederatedExecutor(str(uuid.uuid4()), relay="tcp://no-such-host.invalid:55700")


@pytest.mark.timeout(60)
def test_a_relay_started_just_after_the_executor_is_not_taken_for_absent(tmp_path):
    """Refused connections are tried again for a moment: a relay that is
    still starting (binding) is waited for, not reported missing."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    relay = subprocess.Popen([sys.executable, "-c", f"import time, socket; time.sleep(0.7); "
                              f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(30)"],
                             stdin=subprocess.DEVNULL)
    try:
        from fedexec.first_contact import check_listening
        with within(3.0, "waiting for a listener that comes after 0.7 s"):
            check_listening(address)   # no error: it came within the grace
    finally:
        stop_process(relay)


# -- 3. a mistyped endpoint id, an unknown name, a local endpoint's name ---------------------

@pytest.mark.timeout(60)
def test_a_mistyped_endpoint_id_is_unknown_endpoint_naming_the_fix(tmp_path):
    with running_relay(tmp_path) as address:
        typo = str(uuid.uuid4())
        with within(5.0, "UnknownEndpoint for an id the relay does not know"):
            with pytest.raises(UnknownEndpoint) as info:
                FederatedExecutor(typo, relay=address)
    assert typo in str(info.value) and "fedexec endpoint list" in str(info.value)
    assert isinstance(info.value, LookupError)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["laptpo", "1234", "not-a-uuid"])
def test_an_unknown_endpoint_name_is_unknown_endpoint_at_once(name):
    threads = dispatcher_threads()
    with within(1.0, "UnknownEndpoint for a name nothing goes by"):
        with pytest.raises(UnknownEndpoint) as info:
            FederatedExecutor(name, relay=f"tcp://127.0.0.1:{free_port()}")
    message = str(info.value)
    assert repr(name) in message and "fedexec endpoint list" in message and "fedexec group list" in message
    assert "groups" not in type(info.value).__name__
    assert dispatcher_threads() == threads


@pytest.mark.timeout(120)
def test_a_locally_configured_endpoints_name_is_accepted_where_an_id_is(tmp_path):
    with running_relay(tmp_path) as address:
        with endpoint_process(tmp_path, "laptop", address) as (config, proc, log):
            # its relay comes from its config.toml: no relay= needed
            with FederatedExecutor("laptop") as ex:
                assert ex.endpoint_id == config.endpoint_id and ex.relay == address
                assert ex.submit(pow, 2, 10).result(60) == 1024
            with FederatedExecutor(["laptop"][0], relay=address) as ex:
                assert ex.submit(pid_of_worker).result(60) != os.getpid()


# -- 4. an endpoint the relay knows but that is not connected --------------------------------

@pytest.mark.timeout(180)
def test_a_known_but_disconnected_endpoint_warns_or_fails_with_wait_for_endpoint(tmp_path):
    with running_relay(tmp_path) as address:
        with endpoint_process(tmp_path, "away", address) as (config, proc, log):
            pass   # it connected once, and has stopped: the relay knows it, disconnected
        endpoint_id = config.endpoint_id
        deadline = time.monotonic() + 30
        while lookup_status(address, endpoint_id) != "disconnected":
            assert time.monotonic() < deadline, "the relay still says the stopped endpoint is connected"
            time.sleep(0.2)
        # without wait_for_endpoint: a warning at construction, and tasks wait
        with within(5.0, "the construction with the warning"):
            with pytest.warns(EndpointNotConnectedWarning) as caught:
                ex = FederatedExecutor(endpoint_id, relay=address)
        message = str(caught[0].message)
        assert endpoint_id in message and "not connected" in message and "wait_for_endpoint" in message
        assert caught[0].filename == __file__, "the warning should point at the caller's line"
        future = ex.submit(pow, 3, 3)
        assert not future.done()
        # with wait_for_endpoint: an error once that time has passed
        with within(5.0, "EndpointNotConnected with wait_for_endpoint=1"):
            with pytest.raises(EndpointNotConnected) as info:
                FederatedExecutor(endpoint_id, relay=address, wait_for_endpoint=1)
        assert "did not connect within wait_for_endpoint=1 s" in str(info.value)
        assert "fedexec endpoint start" in str(info.value)
        # the endpoint comes back: the waiting task runs, and a waiting constructor returns
        with endpoint_process(tmp_path, "away", address, endpoint_id=endpoint_id):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with FederatedExecutor(endpoint_id, relay=address, wait_for_endpoint=60) as other:
                    assert other.submit(pow, 2, 5).result(60) == 32
            assert future.result(60) == 27
            ex.shutdown()


def lookup_status(address: str, endpoint_id: str) -> str | None:
    from fedexec.relay.query import lookup_endpoint as query

    seen = query(address, endpoint_id, timeout=5)
    return seen["status"] if seen else None


@pytest.mark.timeout(120)
def test_wait_for_endpoint_returns_as_soon_as_the_endpoint_connects(tmp_path):
    with running_relay(tmp_path) as address:
        with endpoint_process(tmp_path, "late", address) as (config, proc, log):
            pass
        endpoint_id = config.endpoint_id
        while lookup_status(address, endpoint_id) != "disconnected":
            time.sleep(0.2)
        with contextlib.ExitStack() as stack:
            connected_at: list[float] = []

            def come_back() -> None:   # (endpoint_process returns once the relay sees it connected)
                stack.enter_context(endpoint_process(tmp_path, "late", address, endpoint_id=endpoint_id))
                connected_at.append(time.monotonic())

            # the endpoint comes back 1.5 s after the constructor began to wait for it
            later = threading.Timer(1.5, come_back)
            started = time.monotonic()
            later.start()
            try:
                with FederatedExecutor(endpoint_id, relay=address, wait_for_endpoint=60) as ex:
                    returned_at = time.monotonic()
                    assert ex.submit(abs, -4).result(60) == 4
            finally:
                later.join()
            assert connected_at, "the endpoint did not come back"
            # it waited for the endpoint (not less), and returned when it connected, not at its 60 s
            assert returned_at - started >= 1.5, f"the constructor returned after {returned_at - started:.1f} s"
            late_by = returned_at - connected_at[0]
            assert late_by < 3.0, f"the constructor returned {late_by:.1f} s after the endpoint connected"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [-1, "10", True, float("inf")])
def test_wait_for_endpoint_must_be_seconds(bad):
    with pytest.raises(ValueError, match="wait_for_endpoint"):
        FederatedExecutor(str(uuid.uuid4()), relay=f"tcp://127.0.0.1:{free_port()}", wait_for_endpoint=bad)


# -- 5. every error fedexec raises is a FedexecError, exported -------------------------------

def _fedexec_modules():
    for info in pkgutil.walk_packages(fedexec.__path__, "fedexec."):
        if info.name.endswith("__main__") or ".parsl" in info.name:
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError:   # an optional dependency (parsl, ...) not installed
            continue


# exceptions that never reach a user of the package: raised and caught inside it, or on the
# relay's/endpoint's side only (where they become log lines and the messages clients see)
INTERNAL = {"FuturesFound", "_NotInTask", "_LoadFailure", "NotData", "ProtocolError", "AccessDenied",
            "CommandError", "RemoteTraceback", "TaskDirError", "AddressInUse", "ProviderError", "NotYetChecked",
            "LinkError", "_RelayFailed", "_RelayStopped"}   # (_Relay*: inside a colocated process's loop only,
                                                            # colocated.py)


def test_every_exception_class_of_the_package_is_a_fedexec_error_and_exported():
    defined = {}
    for module in _fedexec_modules():
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException) and not issubclass(value, Warning)
                    and value.__module__ == module.__name__ and name not in INTERNAL):
                defined[name] = value
    assert "UnknownEndpoint" in defined and "ConfigError" in defined
    not_ours = sorted(name for name, cls in defined.items() if not issubclass(cls, FedexecError))
    assert not not_ours, f"exceptions a user can see that are not FedexecErrors: {not_ours}"
    # exported, or (raised on an endpoint's side, as SandboxUnavailable) a kind of one that is
    exported = {getattr(fedexec, name) for name in fedexec.__all__}
    hidden = sorted(name for name, cls in defined.items()
                    if cls not in exported and not any(base in exported for base in cls.__mro__[1:-3]
                                                       if base is not FedexecError))
    assert not hidden, f"FedexecErrors not exported from fedexec (nor kinds of one that is): {hidden}"
    assert {"UnknownEndpoint", "ConfigError", "BrokenExecutor", "InitializerFailed", "EndpointNotConnected",
            "TransferError", "ExecutorShutDown"} <= set(fedexec.__all__)


def test_the_standard_errors_keep_their_standard_bases():
    import concurrent.futures as cf

    assert issubclass(fedexec.BrokenExecutor, cf.BrokenExecutor)
    assert issubclass(fedexec.InitializerFailed, cf.BrokenExecutor)
    assert issubclass(fedexec.ExecutorShutDown, RuntimeError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(UnknownEndpoint, LookupError)
