"""The fake Globus Auth/Groups service answers the REAL globus-sdk, over real
loopback sockets (no mocks): introspection, client credentials, the native
app (PKCE) flow, refresh, dependent tokens and Groups my_groups."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlsplit

import globus_sdk
import pytest
import requests

from fake_globus import GROUPS_RS, GROUPS_SCOPE, FakeGlobusAuth

RELAY_ID, RELAY_SECRET = str(uuid.uuid4()), "relay-secret"
EP_ID, EP_SECRET = str(uuid.uuid4()), "endpoint-secret"
NATIVE_ID = str(uuid.uuid4())
RELAY_SCOPE = f"https://auth.globus.org/scopes/{RELAY_ID}/all"
GID = str(uuid.uuid4())


@pytest.fixture
def fake(monkeypatch):
    with FakeGlobusAuth() as f:
        for k, v in f.env().items():
            monkeypatch.setenv(k, v)
        f.add_client(RELAY_ID, RELAY_SECRET)
        f.add_client(EP_ID, EP_SECRET)
        f.add_client(NATIVE_ID)  # native app: no secret
        f.add_user("alice@example.org", groups=[GID], linked=[str(uuid.uuid4())])
        f.add_user("bob@example.org")
        yield f


def relay():
    return globus_sdk.ConfidentialAppAuthClient(RELAY_ID, RELAY_SECRET)


def test_clients_resolve_to_the_fake(fake):
    assert relay().base_url == fake.url + "/"
    assert globus_sdk.GroupsClient().base_url == fake.url + "/"


def test_introspect_active_with_identity_set(fake):
    tok = fake.issue_token("alice@example.org", scope=RELAY_SCOPE)
    r = relay().oauth2_token_introspect(tok, include="identity_set")
    alice = fake.users["alice@example.org"]
    assert r["active"] is True and r["username"] == "alice@example.org"
    assert r["sub"] == alice["sub"] and r["scope"] == RELAY_SCOPE
    assert r["aud"] == [RELAY_ID] and r["exp"] > r["iat"]
    assert r["identity_set"] == alice["identity_set"] and len(r["identity_set"]) == 2
    assert "identity_set" not in relay().oauth2_token_introspect(tok).data
    assert fake.calls["/v2/oauth2/token/introspect"] == 2


@pytest.mark.parametrize("how", ["unknown", "revoked", "expired"])
def test_introspect_inactive(fake, how):
    tok = fake.issue_token("alice@example.org", scope=RELAY_SCOPE)
    if how == "unknown":
        tok = "not-a-token"
    elif how == "revoked":
        fake.revoke(tok)
    else:
        fake.expire(tok)
    assert relay().oauth2_token_introspect(tok, include="identity_set").data == {"active": False}


def test_introspect_wrong_secret_is_auth_api_error(fake):
    tok = fake.issue_token("alice@example.org")
    bad = globus_sdk.ConfidentialAppAuthClient(RELAY_ID, "wrong")
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        bad.oauth2_token_introspect(tok)
    assert ei.value.http_status == 401 and ei.value.code == "INVALID_CLIENT"


def test_client_credentials(fake):
    ep = globus_sdk.ConfidentialAppAuthClient(EP_ID, EP_SECRET)
    r = ep.oauth2_client_credentials_tokens(requested_scopes=[RELAY_SCOPE, GROUPS_SCOPE])
    assert set(r.by_resource_server) == {RELAY_ID, GROUPS_RS}
    tok = r.by_resource_server[RELAY_ID]["access_token"]
    info = relay().oauth2_token_introspect(tok)
    assert info["username"] == f"{EP_ID}@clients.auth.globus.org"
    assert info["sub"] == EP_ID and info["client_id"] == EP_ID and info["aud"] == [RELAY_ID]


def test_native_app_pkce_flow_and_refresh(fake):
    fake.login_as = "alice@example.org"
    native = globus_sdk.NativeAppAuthClient(NATIVE_ID)
    native.oauth2_start_flow(requested_scopes=[RELAY_SCOPE], refresh_tokens=True)
    url = native.oauth2_get_authorize_url()
    assert url.startswith(fake.url + "/v2/oauth2/authorize?")
    # the "browser": the fake's authorize page redirects with a code
    loc = requests.get(url, allow_redirects=False, timeout=5).headers["Location"]
    assert loc.startswith(fake.url + "/v2/web/auth-code?")
    code = parse_qs(urlsplit(loc).query)["code"][0]
    tokens = native.oauth2_exchange_code_for_tokens(code)
    t = tokens.by_resource_server[RELAY_ID]
    assert t["refresh_token"] and t["expires_at_seconds"] > 0
    assert relay().oauth2_token_introspect(t["access_token"])["username"] == "alice@example.org"
    # codes are single-use
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        native.oauth2_exchange_code_for_tokens(code)
    assert ei.value.http_status == 400
    # refresh (native apps send client_id in the body)
    r = native.oauth2_refresh_token(t["refresh_token"])
    new = r.by_resource_server[RELAY_ID]["access_token"]
    assert new != t["access_token"] and relay().oauth2_token_introspect(new)["active"]


def test_native_app_wrong_verifier_rejected(fake):
    fake.login_as = "alice@example.org"
    a = globus_sdk.NativeAppAuthClient(NATIVE_ID)
    a.oauth2_start_flow(requested_scopes=RELAY_SCOPE)
    loc = requests.get(a.oauth2_get_authorize_url(), allow_redirects=False, timeout=5)
    code = parse_qs(urlsplit(loc.headers["Location"]).query)["code"][0]
    b = globus_sdk.NativeAppAuthClient(NATIVE_ID)
    b.oauth2_start_flow(requested_scopes=RELAY_SCOPE)  # different verifier
    with pytest.raises(globus_sdk.AuthAPIError):
        b.oauth2_exchange_code_for_tokens(code)


def test_preregistered_auth_code(fake):
    fake.add_auth_code("code-123", "bob@example.org", scope=f"{RELAY_SCOPE} {GROUPS_SCOPE}")
    native = globus_sdk.NativeAppAuthClient(NATIVE_ID)
    native.oauth2_start_flow(requested_scopes=[RELAY_SCOPE, GROUPS_SCOPE], refresh_tokens=True)
    r = native.oauth2_exchange_code_for_tokens("code-123")
    assert set(r.by_resource_server) == {RELAY_ID, GROUPS_RS}
    assert r.by_scopes[GROUPS_SCOPE]["resource_server"] == GROUPS_RS
    assert "id_token" not in r.data


def test_dependent_tokens_then_groups(fake):
    user_tok = fake.issue_token("alice@example.org", scope=RELAY_SCOPE)
    dep = relay().oauth2_get_dependent_tokens(user_tok, scope=GROUPS_SCOPE)
    gtok = dep.by_resource_server[GROUPS_RS]["access_token"]
    gc = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(gtok))
    groups = gc.get_my_groups()
    assert [g["id"] for g in groups] == [GID]
    m = groups[0]["my_memberships"][0]
    assert m["username"] == "alice@example.org" and m["status"] == "active"
    assert m["identity_id"] == fake.users["alice@example.org"]["sub"]
    assert fake.calls["/v2/groups/my_groups"] == 1
    # default scope -> a groups token too
    assert GROUPS_RS in relay().oauth2_get_dependent_tokens(user_tok).by_resource_server


def test_dependent_tokens_require_audience(fake):
    user_tok = fake.issue_token("alice@example.org", scope=RELAY_SCOPE)
    ep = globus_sdk.ConfidentialAppAuthClient(EP_ID, EP_SECRET)
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        ep.oauth2_get_dependent_tokens(user_tok)
    assert ei.value.http_status == 400


def test_groups_rejects_wrong_or_dead_tokens(fake):
    relay_tok = fake.issue_token("alice@example.org", scope=RELAY_SCOPE)
    gtok = fake.issue_token("bob@example.org", scope=GROUPS_SCOPE)
    gc = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(gtok))
    assert gc.get_my_groups().data == []
    fake.revoke(gtok)
    for t in (relay_tok, gtok):
        c = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(t))
        with pytest.raises(globus_sdk.GroupsAPIError) as ei:
            c.get_my_groups()
        assert ei.value.http_status == 401


def test_injected_failure(fake):
    tok = fake.issue_token("alice@example.org")
    fake.fail("/v2/oauth2/token/introspect", status=403)
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        relay().oauth2_token_introspect(tok)
    assert ei.value.http_status == 403
    assert relay().oauth2_token_introspect(tok)["active"]


def test_membership_change_and_concurrent_introspection(fake):
    from concurrent.futures import ThreadPoolExecutor

    gtok = fake.issue_token("alice@example.org", scope=GROUPS_SCOPE)
    gc = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(gtok))
    fake.set_groups("alice@example.org", [])
    assert gc.get_my_groups().data == []
    toks = [fake.issue_token("bob@example.org", scope=RELAY_SCOPE) for _ in range(20)]
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda t: relay().oauth2_token_introspect(t)["active"], toks))
    assert all(out) and fake.calls["/v2/oauth2/token/introspect"] == 20
