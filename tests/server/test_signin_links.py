"""One-time console sign-in links and the node run command."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
import requests

from server.auth.service import create_link, spend_link


def _link(server) -> str:
    r = requests.post(f"{server.url}/api/v1/session/links", headers={"Authorization": f"Bearer {server.admin_token}"})
    assert r.status_code == 200, r.text
    return server.url + r.json()["path"]


def test_a_link_signs_in_once(server):
    link = _link(server)
    browser = requests.Session()
    r = browser.get(link, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/nodes"
    assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"
    cookie = next(c for c in browser.cookies if c.name == "sly_session")
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert browser.get(f"{server.url}/api/v1/agents").status_code == 200
    assert browser.get(f"{server.url}/nodes").status_code == 200
    # Spent: another browser gets the sign-in page and no session.
    other = requests.Session()
    r = other.get(link)
    assert r.url == f"{server.url}/signin?link=spent" and "Sign in" in r.text
    assert "sly_session" not in other.cookies
    assert other.get(f"{server.url}/api/v1/agents").status_code == 401


def test_making_a_link_needs_the_admin(server):
    assert requests.post(f"{server.url}/api/v1/session/links").status_code == 401
    r = requests.post(f"{server.url}/api/v1/session/links", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_unknown_expired_and_cookie_forms_are_refused(own_server):
    srv, client, _ = own_server()
    for bad in ("nope", "x" * 300):
        r = requests.get(f"{srv.url}/signin/{bad}", allow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/signin?link=spent" and "set-cookie" not in r.headers
    link = _link(srv)
    token = link.rsplit("/", 1)[1]
    # Stored hashed; the link's token used as a session cookie is no session.
    db = sqlite3.connect(srv.data_dir / "server.db")
    assert not db.execute("select 1 from console_sessions where id_hash like ?", (f"%{token}%",)).fetchall()
    assert requests.get(f"{srv.url}/api/v1/agents", cookies={"sly_session": token}).status_code == 401
    # Expired: the row outlived its time.
    db.execute("update console_sessions set expires_at = 1")
    db.commit()
    db.close()
    r = requests.get(link, allow_redirects=False)
    assert r.headers["location"] == "/signin?link=spent" and "set-cookie" not in r.headers


def test_spend_link_ignores_empty_and_oversized_tokens():
    assert spend_link(None, "k" * 32, "") is False and spend_link(None, "k" * 32, "a" * 129) is False


def test_an_unspent_link_dies_with_the_admin_token_that_made_it(engine):
    """A link is keyed by the admin token: after the token changes, a link made before (and not yet
    spent) no longer signs anyone in, as sessions made before do not."""
    old, new = "O" * 32, "N" * 32
    with engine.begin() as conn:
        token, _ = create_link(conn, old)
    with engine.begin() as conn:
        assert spend_link(conn, new, token) is False, "a link made under the old admin token still works"
    with engine.begin() as conn:
        assert spend_link(conn, old, token) is True  # it was only refused, not spent
    with engine.begin() as conn:
        assert spend_link(conn, old, token) is False  # once


@pytest.mark.slow
def test_a_link_survives_a_restart_but_not_an_admin_token_change(fresh_server):
    srv = fresh_server
    kept, dropped = _link(srv), _link(srv)
    srv.stop()
    srv.start()
    assert requests.get(kept, allow_redirects=False).headers["location"] == "/nodes"
    srv.stop()
    srv.admin_token = "N" * 40
    srv.start()
    r = requests.get(dropped, allow_redirects=False)
    assert r.headers["location"] == "/signin?link=spent" and "set-cookie" not in r.headers


def test_run_command_uses_host_network_and_names_no_path_by_the_token(server, client):
    a = client.create_agent("runcmd-node")
    docker = a["run_command"]["docker"]
    assert "--network host" in docker
    assert f"-e ACCESS_TOKEN={a['token']} " in docker
    assert docker.count(a["token"]) == 1, "the token is only the env value, never part of a path"
    # named by a hash of the token, the agent's own token-free default (node.config)
    assert f"$HOME/.supervisely-agent/n-{hashlib.sha256(a['token'].encode()).hexdigest()[:16]}" in docker
    rotated = client.rotate_token(a["id"])
    assert rotated["run_command"]["docker"].count(rotated["token"]) == 1
    assert "$HOME/.supervisely-agent/n-" in rotated["run_command"]["docker"]
