"""Globus Auth tokens for clients and endpoints of a ``globus``-mode relay.

A person logs in once with ``fedexec login`` (globus-sdk's native-app flow);
the tokens are kept in ``$FEDEXEC_HOME/globus-tokens.json`` (mode 0600) and
refreshed when they expire. An endpoint (a service, no person at hand)
uses its own Globus app's client credentials from the environment:
``FEDEXEC_GLOBUS_CLIENT_ID``, ``FEDEXEC_GLOBUS_CLIENT_SECRET`` and
``FEDEXEC_GLOBUS_SCOPE`` (the relay's scope).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .auth import globus_tokens_path, write_secret_value

NATIVE_CLIENT_ENV = "FEDEXEC_GLOBUS_NATIVE_CLIENT_ID"
SCOPE_ENV = "FEDEXEC_GLOBUS_SCOPE"
CLIENT_ID_ENV = "FEDEXEC_GLOBUS_CLIENT_ID"
CLIENT_SECRET_ENV = "FEDEXEC_GLOBUS_CLIENT_SECRET"
EARLY = 60.0   # seconds before expiry a token is renewed


def _save(path: Path, data: dict[str, Any]) -> None:
    write_secret_value(path, json.dumps(data))


def _record(client_id: str, scope: str, token: dict[str, Any]) -> dict[str, Any]:
    return {"client_id": client_id, "scope": scope, "access_token": token["access_token"],
            "refresh_token": token.get("refresh_token"),
            "expires_at": time.time() + float(token.get("expires_in") or 0)}


def login_interactively(client_id: str | None, scope: str | None,
                        read_code: Callable[[str], str] = input) -> Path:
    """Run the native-app login: print the link, read the code the person
    pastes back, keep the tokens. Returns where they were saved."""
    import globus_sdk

    client_id = client_id or os.environ.get(NATIVE_CLIENT_ENV)
    scope = scope or os.environ.get(SCOPE_ENV)
    if not client_id:
        raise ValueError(f"give the Globus native app to log in with: --client-id or ${NATIVE_CLIENT_ENV}")
    if not scope:
        raise ValueError(f"give the relay's Globus scope: --scope or ${SCOPE_ENV}")
    client = globus_sdk.NativeAppAuthClient(client_id)
    client.oauth2_start_flow(requested_scopes=scope, refresh_tokens=True)
    print("Log in with Globus at this address, then paste the code it shows:")
    print(client.oauth2_get_authorize_url(), flush=True)
    code = read_code("Code: ").strip()
    if not code:
        raise ValueError("no code was given")
    try:
        tokens = client.oauth2_exchange_code_for_tokens(code)
    except globus_sdk.GlobusAPIError as exc:
        raise ValueError(f"Globus Auth refused the code: {exc.message}") from None
    path = globus_tokens_path()
    _save(path, _record(client_id, scope, tokens.data))
    return path


def stored_token() -> str | None:
    """The logged-in user's access token, refreshed if it is about to expire;
    None if there is none (or it can no longer be refreshed)."""
    path = globus_tokens_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("access_token"):
        return None
    if data.get("expires_at", 0) > time.time() + EARLY:
        return str(data["access_token"])
    if not data.get("refresh_token"):
        return None
    import globus_sdk

    try:
        fresh = globus_sdk.NativeAppAuthClient(data["client_id"]).oauth2_refresh_token(data["refresh_token"])
    except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError):
        return None
    token = dict(fresh.data)
    token.setdefault("refresh_token", data["refresh_token"])
    _save(path, _record(data["client_id"], data["scope"], token))
    return str(token["access_token"])


_client_token: dict[str, Any] = {}
_client_lock = threading.Lock()


def client_credentials_token() -> str | None:
    """An access token for this program's own Globus app (client credentials
    in the environment), kept until shortly before it expires; None when
    no app is configured."""
    client_id, secret = os.environ.get(CLIENT_ID_ENV), os.environ.get(CLIENT_SECRET_ENV)
    if not (client_id and secret):
        return None
    with _client_lock:
        if _client_token.get("id") == client_id and _client_token.get("expires_at", 0) > time.time() + EARLY:
            return str(_client_token["access_token"])
        import globus_sdk

        scope = os.environ.get(SCOPE_ENV)
        if not scope:
            raise ValueError(f"${CLIENT_ID_ENV} is set but ${SCOPE_ENV} (the relay's scope) is not")
        client = globus_sdk.ConfidentialAppAuthClient(client_id, secret)
        tokens = client.oauth2_client_credentials_tokens(requested_scopes=scope)
        _client_token.update(_record(client_id, scope, tokens.data), id=client_id)
        return str(_client_token["access_token"])
