"""streamdiff.server.routes: which paths are pages, probes, metrics or WebSockets (no server needed)."""

from __future__ import annotations

from types import SimpleNamespace

from streamdiff.server.app import WEB_DIR
from streamdiff.server.routes import StaticFiles, route


def test_routes() -> None:
    static = StaticFiles(WEB_DIR)
    metrics = SimpleNamespace(render=lambda: (b"# metrics\n", "text/plain; version=1.0.0"))
    hub = SimpleNamespace(ready=True, metrics=metrics)
    assert route("/ws", static, hub) is None and route("/ws/view/abc?x=1", static, hub) is None
    page = route("/", static, hub)
    assert page.status == 200 and page is route("/index.html", static, hub)
    assert dict(page.headers)["Content-Security-Policy"].startswith("default-src 'none'")
    assert route("/app.js", static, hub).content_type.startswith("text/javascript")
    assert "Content-Security-Policy" not in dict(route("/app.js", static, hub).headers)
    assert route("/view.html?view=TOKEN", static, hub).status == 200
    assert route("/healthz", static, hub).body == b"ok\n"
    assert route("/readyz", static, hub).status == 200
    assert route("/readyz", static, SimpleNamespace(ready=False, metrics=metrics)).status == 503
    assert route("/metrics", static, hub).body == b"# metrics\n"
    for path in ("/web/app.js", "/../pyproject.toml", "/%2e%2e/app.py", "/index.htm", "/ws2"):
        assert route(path, static, hub).status == 404, path
