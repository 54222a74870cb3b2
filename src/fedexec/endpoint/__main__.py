"""``python -m fedexec.endpoint``: run an endpoint in the foreground.

Either a configured endpoint (``--name NAME``, read from the fedexec home,
with its state in ``endpoint.json`` beside its config) or one described
entirely on the command line (the embedded default).
"""

import argparse
import sys
from pathlib import Path

from ..auth import check_token
from ..config import ConfigError, EndpointConfig, endpoint_dir, endpoint_lock
from ..errors import AuthenticationFailed
from ..gcpolicy import for_service
from ..logs import configure as configure_logging
from ..pidfile import PidFile
from ..private import make_private, private_dir
from .agent import EndpointAgent


def main(argv: list[str] | None = None) -> None:
    make_private()   # its directory holds the pool secret, batch scripts, logs
    parser = argparse.ArgumentParser(prog="python -m fedexec.endpoint")
    parser.add_argument("--name", required=True)
    parser.add_argument("--relay", help="relay address; with it, nothing is read from the fedexec home")
    parser.add_argument("--endpoint-id")
    parser.add_argument("--max-workers", type=int, default=0)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--worker-batch", type=int, default=None)
    parser.add_argument("--heartbeat-period", type=float, default=None,
                        help="seconds between heartbeats to the relay (default 2)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    parser.add_argument("--secret-file", default=None, help="file holding the relay's local secret")
    parser.add_argument("--relay-key", default="", help="the relay's CURVE public key (encrypts the connection)")
    parser.add_argument("--pools-in-process", action=argparse.BooleanOptionalAction, default=None,
                        help="with --relay: run the local pool inside this process (the default); "
                             "--no-pools-in-process: in a pool process of its own")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="also log to this file (appended, private); a daemon's stderr already goes to its log")
    ns = parser.parse_args(argv)
    configure_logging(ns.log_level, ns.log_file)
    pidfile = None
    state_dir = None
    try:
        if ns.relay:
            config = EndpointConfig(name=ns.name, relay=ns.relay, max_workers=ns.max_workers, prefetch=ns.prefetch)
            if ns.worker_batch is not None:
                config.worker_batch = ns.worker_batch
            if ns.heartbeat_period is not None:
                config.heartbeat_period = ns.heartbeat_period
            if ns.endpoint_id:
                config.endpoint_id = ns.endpoint_id
            config.relay_public_key = ns.relay_key
            config.provider.in_process = ns.pools_in_process
            config.validate()
        else:
            config = EndpointConfig.load(ns.name)
            if not endpoint_lock(ns.name, hold=True):   # (before anything starts: it runs once)
                sys.exit(f"fedexec endpoint: endpoint {ns.name} is already running (on its own or inside a relay: "
                         "its lock is held)")
            pidfile = PidFile(endpoint_dir(ns.name) / "endpoint.json")
            state_dir = private_dir(endpoint_dir(ns.name))   # also when made earlier with looser bits
        check_token(config.relay, None, config.relay_public_key or None)   # before any pool starts
        agent = EndpointAgent(config, parent_pid=ns.parent_pid, secret_file=ns.secret_file, state_dir=state_dir)
    except ConfigError as exc:
        sys.exit(f"fedexec endpoint: {exc}")
    except AuthenticationFailed as exc:   # as when the relay refuses the credentials (the agent's code 2)
        print(f"fedexec endpoint: {exc}", file=sys.stderr)
        sys.exit(2)

    def connected(agent: EndpointAgent) -> None:
        if pidfile is not None:
            pidfile.write(endpoint_id=config.endpoint_id, relay=config.relay, status="connected",
                          workers=agent.workers)
        if ns.parent_pid is None:  # run by a person, not embedded in a program
            print(f"Endpoint {config.name} ({config.endpoint_id}) connected to relay {config.relay} "
                  f"with {agent.workers} workers", flush=True)

    agent.on_connected = connected
    if pidfile is not None:
        pidfile.write(endpoint_id=config.endpoint_id, relay=config.relay, status="connecting",
                      workers=agent.workers)
    for_service()
    try:
        agent.run()
    finally:
        if pidfile is not None:
            pidfile.remove()
    if agent.exit_code:
        sys.exit(agent.exit_code)


if __name__ == "__main__":
    main()
