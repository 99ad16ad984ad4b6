"""nti serve's front door against other sites' web pages: a token-less server on 127.0.0.1 (the default) took form
POSTs from any page the user visited (browsers send those 'simple' requests without asking the server), and a
DNS-rebinding page (its own name resolved to 127.0.0.1) was same-origin to it and could read every answer."""
import pytest

pytest.importorskip("fastapi")
from starlette.testclient import TestClient  # noqa: E402

from nti.serve import Guard, ServeSettings, host_name, is_loopback  # noqa: E402


async def ok_app(scope, receive, send):
    """What stands behind the guard: 200 'ok' for anything that gets through."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def client(**settings) -> TestClient:
    return TestClient(Guard(ok_app, ServeSettings(**settings)), base_url="http://127.0.0.1:8000")


def test_a_form_post_from_another_sites_page_is_refused():
    c = client()
    attack = c.post("/v1/inversions", headers={"Origin": "http://evil.example"}, data={"source_prompt": "a cat"})
    assert attack.status_code == 403
    error = attack.json()["error"]
    assert error["param"] == "origin" and "another origin (http://evil.example)" in error["message"]
    assert c.post("/v1/inversions", headers={"Origin": "null"}).status_code == 403  # a sandboxed frame, file://
    assert c.post("/v1/inversions", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # the server's own page (same origin), and programs, which send no Origin, pass
    assert c.post("/v1/inversions", headers={"Origin": "http://127.0.0.1:8000"}).text == "ok"
    assert c.post("/v1/inversions", headers={"Sec-Fetch-Site": "same-origin"}).text == "ok"
    assert c.post("/v1/inversions").text == "ok"


def test_a_loopback_server_answers_only_requests_that_name_this_machine():
    c = client(local_only=True)
    assert c.get("/").text == "ok"  # Host 127.0.0.1:8000
    for host in ("localhost:8000", "[::1]:8000", "127.0.0.2:8000", "app.localhost:8000"):
        assert c.get("/", headers={"Host": host}).text == "ok", host
    rebound = c.get("/v1/edits/x", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403 and rebound.json()["error"]["param"] == "host"
    assert "not this machine's loopback" in rebound.json()["error"]["message"]
    # a server bound to another address (--host 0.0.0.0) is called by whatever name reaches it
    assert client(local_only=False).get("/", headers={"Host": "gpu-box.lan:8000"}).text == "ok"


def test_the_checks_run_before_the_token_check():
    """A cross-site page is refused as such even when a token is set (it could not send the token anyway)."""
    c = client(token="secret")
    assert c.post("/v1/inversions", headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/v1/inversions").status_code == 401
    assert c.post("/v1/inversions", headers={"Authorization": "Bearer secret"}).text == "ok"


@pytest.mark.parametrize("value, name", [("localhost:8000", "localhost"), ("[::1]:8000", "[::1]"), ("::1", "::1"),
                                         ("Example.COM", "example.com"), ("127.0.0.1", "127.0.0.1")])
def test_host_name(value, name):
    assert host_name(value) == name


def test_is_loopback():
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.8.9.10", "::1", "[::1]", "x.localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.2", "example.com", "localhost.example.com", ""]))


def test_nti_serve_on_loopback_checks_the_host(monkeypatch):
    """The command line sets local_only from --host."""
    import nti.serve
    from nti.cli import main

    seen = {}
    monkeypatch.setattr(nti.serve, "serve", lambda settings, host, port: seen.update(settings=settings, host=host))
    monkeypatch.setattr("nti.serve_cli.check_listen", lambda host, port: None)
    assert main(["serve", "--port", "8123", "--quiet"]) == 0 and seen["settings"].local_only is True
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123", "--quiet"]) == 0
    assert seen["settings"].local_only is False and seen["host"] == "0.0.0.0"


def test_behind_a_reverse_proxy_the_page_and_its_names_pass():
    """TLS in front (docs/serving.md): the page's origin is the proxy's name and the Host the proxy's choice; a proxy
    says so with X-Forwarded-Host / -For, headers a web page cannot set. A page of another site is still refused."""
    c = client(local_only=True)
    proxied = {"Host": "127.0.0.1:8000", "X-Forwarded-Host": "edit.example.org", "X-Forwarded-For": "203.0.113.9"}
    assert c.post("/v1/inversions", headers={**proxied, "Origin": "https://edit.example.org"}).text == "ok"
    passed_through = {"Host": "edit.example.org", "X-Forwarded-For": "203.0.113.9"}  # proxy_set_header Host $host
    assert c.post("/v1/inversions", headers={**passed_through, "Origin": "https://edit.example.org"}).text == "ok"
    assert c.post("/v1/inversions", headers={**proxied, "Origin": "https://evil.example"}).status_code == 403
    assert c.get("/", headers={"Host": "edit.example.org"}).status_code == 403  # not forwarded: a rebinding page
