"""streamdiff.server.routes: which paths are pages, probes, metrics or WebSockets (no server needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from websockets.datastructures import Headers

from streamdiff.errors import ConfigError
from streamdiff.server.app import WEB_DIR
from streamdiff.server.hub import ServerConfig
from streamdiff.protocol.policy import HostPolicy
from streamdiff.server.routes import StaticFiles, route

METRICS = SimpleNamespace(render=lambda: (b"# metrics\n", "text/plain; version=1.0.0"))


def _hub(ready: bool = True, **config) -> SimpleNamespace:
    return SimpleNamespace(ready=ready, metrics=METRICS, config=ServerConfig(**config))


def test_routes() -> None:
    static = StaticFiles(WEB_DIR)
    hub = _hub()
    assert route("/ws", static, hub) is None and route("/ws/view/abc?x=1", static, hub) is None
    page = route("/", static, hub)
    assert page.status == 200 and page is route("/index.html", static, hub)
    assert dict(page.headers)["Content-Security-Policy"].startswith("default-src 'none'")
    assert route("/app.js", static, hub).content_type.startswith("text/javascript")
    assert "Content-Security-Policy" not in dict(route("/app.js", static, hub).headers)
    assert route("/view.html?view=TOKEN", static, hub).status == 200
    assert route("/healthz", static, hub).body == b"ok\n"
    assert route("/readyz", static, hub).status == 200
    assert route("/readyz", static, _hub(ready=False)).status == 503
    assert route("/metrics", static, hub).body == b"# metrics\n"
    for path in ("/web/app.js", "/../pyproject.toml", "/%2e%2e/app.py", "/index.htm", "/ws2"):
        assert route(path, static, hub).status == 404, path


@pytest.mark.parametrize("target", ["/ws?x=1", "/ws?", "/ws?token=s3cret", "/ws?a=1&b=2"])
def test_the_stream_socket_takes_no_query_string(target: str) -> None:
    reply = route(target, StaticFiles(WEB_DIR), _hub())
    assert (reply.status, reply.body) == (400, b"the stream socket takes no query parameters\n")


def test_host_allowlist_guards_every_route_and_the_upgrades() -> None:
    static = StaticFiles(WEB_DIR)
    hub = _hub(hosts=HostPolicy.of(["studio.example.com", "127.0.0.1", "[::1]"]))
    for host in ("studio.example.com", "STUDIO.example.com:8765", "127.0.0.1:8765", "[::1]:80"):
        headers = Headers(Host=host)
        assert route("/healthz", static, hub, headers).status == 200, host
        assert route("/ws", static, hub, headers) is None and route("/ws/view/t", static, hub, headers) is None
    for host in ("evil.example.com", "rebind.attacker.net:8765", "127.0.0.2", "studio.example.com:x", ""):
        for path in ("/", "/healthz", "/metrics", "/ws", "/ws/view/t"):
            assert route(path, static, hub, Headers(Host=host)).status == 421, (host, path)
    assert route("/healthz", static, hub).status == 421  # no Host header at all
    assert route("/healthz", static, _hub(), Headers(Host="anything.example")).status == 200  # no list: any host


def test_metrics_may_require_the_token() -> None:
    static = StaticFiles(WEB_DIR)
    hub = _hub(token="s3cret", metrics_token_required=True)
    for authorization in (None, "Bearer", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2"):
        headers = Headers() if authorization is None else Headers(Authorization=authorization)
        reply = route("/metrics", static, hub, headers)
        assert reply.status == 401 and b"# metrics" not in reply.body, authorization
        assert dict(reply.headers)["WWW-Authenticate"].startswith("Bearer")
    for authorization in ("Bearer s3cret", "bearer s3cret"):
        assert route("/metrics", static, hub, Headers(Authorization=authorization)).body == b"# metrics\n"
    assert route("/healthz", static, hub).status == 200 and route("/readyz", static, hub).status == 200
    assert route("/metrics", static, _hub(token="s3cret")).status == 200  # not required by default
    with pytest.raises(ConfigError, match="metrics_token_required=True needs a token"):
        ServerConfig(metrics_token_required=True)
