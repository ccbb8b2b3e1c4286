"""Bad input over real HTTP: each case a 400 with the error object naming the parameter;
unknown routes and methods in the same shape; the bearer token; CORS."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from api_harness import RunningApi, api_settings

TOKEN = "s3cret-token-of-the-tests"


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[httpx.Client]:
    with RunningApi(api_settings(database_url, max_points=5_000)) as api, \
            httpx.Client(base_url=api.url, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def secured(database_url: str) -> Iterator[httpx.Client]:
    settings = api_settings(database_url, token=TOKEN, cors_origins=["https://ui.example"])
    with RunningApi(settings) as api, httpx.Client(base_url=api.url, timeout=10) as http:
        yield http


BAD = [
    ("/stats/top-domains?from=yesterday", "from", "invalid_parameter"),
    ("/stats/top-domains?to=2026-02-30T00:00:00Z", "to", "invalid_time"),
    ("/stats/top-domains?to=1969-12-31", "to", "invalid_time"),
    ("/stats/top-domains?from=2026-03-10T12:00:00Z&to=2026-03-10T11:00:00Z", "from",
     "invalid_range"),
    ("/stats/top-domains?limit=0", "limit", "invalid_parameter"),
    ("/stats/top-domains?limit=1001", "limit", "invalid_parameter"),
    ("/stats/top-domains?limit=", "limit", "invalid_parameter"),
    ("/stats/top-domains?limit=abc", "limit", "invalid_parameter"),
    ("/stats/top-domains?offset=-1", "offset", "invalid_parameter"),
    ("/stats/top-domains?sort=size", "sort", "invalid_parameter"),
    ("/stats/top-domains?group=host", "group", "invalid_parameter"),
    ("/stats/top-domains?limit=1&limit=2", "limit", "invalid_parameter"),
    ("/stats/top-domains?frm=2026-03-10", "frm", "unknown_parameter"),
    ("/stats/source-ips?source_ip=300.1.1.1", "source_ip", "invalid_parameter"),
    ("/stats/source-ips?source_ip=", "source_ip", "invalid_parameter"),
    ("/stats/users?status=success", "status", "invalid_parameter"),
    ("/stats/users?domain=a..b", "domain", "invalid_parameter"),
    ("/stats/users?user=a%00b", "user", "invalid_parameter"),
    ("/stats/users?node=", "node", "invalid_parameter"),
    ("/stats/traffic?interval=2m", "interval", "invalid_parameter"),
    ("/stats/traffic?interval=1m&from=2026-01-01&to=2026-02-01", "interval",
     "too_many_points"),
    ("/stats/traffic?from=1970-01-01&to=2026-01-01", "from", "too_many_points"),
    ("/stats/traffic?limit=10", "limit", "unknown_parameter"),
    ("/stats/latency?group_by=user", "group_by", "invalid_parameter"),
    ("/stats/statuses?sort=bytes", "sort", "unknown_parameter"),
    # a bad cursor: BAD_CURSORS below
    ("/nodes?sort=bytes", "sort", "unknown_parameter"),
    ("/nodes?from=2026-01-02&to=2026-01-01", "from", "invalid_range"),
    ("/nodes?limit=5000", "limit", "invalid_parameter"),
    ("/healthz?verbose=1", "verbose", "unknown_parameter"),
    ("/stats/top-domains?from=%FF%FE", "from", "invalid_parameter"),
]


@pytest.mark.parametrize(("path", "parameter", "code"), BAD)
def test_bad_input_is_a_400_naming_the_parameter(client: httpx.Client, path: str,
                                                 parameter: str, code: str) -> None:
    response = client.get(path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["parameter"]) == (code, parameter)
    assert error["message"].startswith(f"{parameter}: ")


_UUID = "60745d3f-128a-4de9-bb80-849d2f490972"


def _echo_base64(raw: str) -> str:
    """What `echo RAW | base64` prints: standard base64 of the line, padded."""
    return base64.b64encode(f"{raw}\n".encode()).decode()


def _base64url(raw: str) -> str:
    """The alphabet and the unpadded form of the cursors the API hands out."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# Every cursor that is not one this API handed out gets the one documented error,
# `invalid_cursor`, whichever check refuses it: its shape (the API's parser) or its content
# (the repository's decoding).
BAD_CURSORS = [
    pytest.param("", id="empty"),
    pytest.param("garbage", id="garbage"),
    pytest.param("not*a*cursor", id="not-base64url"),
    pytest.param("A" * 201, id="too-long"),
    pytest.param("A", id="one-char"),
    pytest.param("AAAA", id="no-separator"),
    *(pytest.param(_echo_base64(raw), id=f"echo-base64-{name}") for name, raw in [
        ("negative", f"-5:{_UUID}"), ("bad-id", "1:zz"),
        ("huge", f"99999999999999999999999:{_UUID}")]),
    *(pytest.param(_base64url(raw), id=f"base64url-{name}") for name, raw in [
        ("bad-id", "1:zz"), ("huge", f"99999999999999999999999:{_UUID}"), ("no-id", "5"),
        ("no-time", f":{_UUID.replace('-', '')}"),
        # what int() and UUID() would take, but the API never hands out
        ("plus", f"+5:{_UUID.replace('-', '')}"), ("space", f" 5:{_UUID.replace('-', '')}"),
        ("underscore", f"5_0:{_UUID.replace('-', '')}"),
        ("other-digits", f"\u0665:{_UUID.replace('-', '')}"),
        ("dashed-id", f"5:{_UUID}"), ("braced-id", f"5:{{{_UUID}}}"),
        ("urn-id", f"5:urn:uuid:{_UUID}"), ("upper-id", f"5:{_UUID.replace('-', '').upper()}")]),
    pytest.param(base64.urlsafe_b64encode(b"\xff\xfe:1").decode().rstrip("="),
                 id="base64url-not-utf8"),
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_every_malformed_cursor_is_invalid_cursor(client: httpx.Client, cursor: str) -> None:
    response = client.get("/logs", params={"cursor": cursor})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["parameter"]) == ("invalid_cursor", "cursor")
    assert error["message"] == "cursor: malformed cursor (use the `next_cursor` of a page)"


def test_too_many_points_says_the_maximum(client: httpx.Client) -> None:
    error = client.get("/stats/traffic?interval=1m&from=2026-01-01&to=2026-02-01").json()
    assert "the maximum is 5000" in error["error"]["message"]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/nope", 404, "not_found"),
    ("GET", "/stats", 404, "not_found"),
    ("GET", "/static/../app.py", 404, "not_found"),
    ("GET", "/static/nothing.js", 404, "not_found"),
    ("POST", "/stats/top-domains", 405, "method_not_allowed"),
    ("DELETE", "/logs", 405, "method_not_allowed"),
])
def test_unknown_routes_and_methods(client: httpx.Client, method: str, path: str,
                                    status: int, code: str) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_request_too_large(client: httpx.Client) -> None:
    response = client.get("/healthz", headers={"x-filler": "x" * 70_000})
    assert response.status_code in (413, 431)


ROUTES = ["/stats/top-domains", "/stats/source-ips", "/stats/users", "/stats/traffic",
          "/stats/latency", "/stats/statuses", "/logs", "/nodes", "/openapi.json", "/dashboard"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-of-the-tests", f"Basic {TOKEN}",
                                    "Bearer", f"Bearer {TOKEN}x", TOKEN])
def test_token_is_required(secured: httpx.Client, path: str, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = secured.get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("path", ROUTES)
def test_token_is_accepted(secured: httpx.Client, path: str) -> None:
    for scheme in ("Bearer", "bearer"):
        response = secured.get(path, headers={"Authorization": f"{scheme} {TOKEN}"})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs",
                                  "/static/dashboard.js"])
def test_public_routes_need_no_token(secured: httpx.Client, path: str) -> None:
    assert secured.get(path).status_code == 200


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-of-the-tests"])
def test_a_browser_without_the_token_gets_the_dashboard_with_its_401(
        secured: httpx.Client, header: str | None) -> None:
    """The page holds no data and asks for the token; a browser cannot send the header when
    it opens a page, so it gets the page, with the 401 that the route answers."""
    headers = {"Accept": BROWSER_ACCEPT, **({"Authorization": header} if header else {})}
    response = secured.get("/dashboard", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="token-dialog"' in response.text
    with_token = secured.get("/dashboard", headers={"Accept": BROWSER_ACCEPT,
                                                    "Authorization": f"Bearer {TOKEN}"})
    assert with_token.status_code == 200 and with_token.text == response.text


def test_only_the_dashboard_answers_a_browser_with_a_page(secured: httpx.Client) -> None:
    response = secured.get("/stats/statuses", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_bad_input_is_checked_after_the_token(secured: httpx.Client) -> None:
    assert secured.get("/stats/top-domains?limit=0").status_code == 401


def test_cors_when_configured(secured: httpx.Client, client: httpx.Client) -> None:
    preflight = secured.options("/stats/top-domains", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
    allowed = secured.get("/stats/statuses", headers={"Origin": "https://ui.example",
                                                      "Authorization": f"Bearer {TOKEN}"})
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    other = secured.get("/stats/statuses", headers={"Origin": "https://evil.example",
                                                    "Authorization": f"Bearer {TOKEN}"})
    assert "access-control-allow-origin" not in other.headers
    # off by default
    plain = client.get("/stats/statuses", headers={"Origin": "https://ui.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_database_down_is_a_503_not_a_crash() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"postgresql://postgres@127.0.0.1:{probe.getsockname()[1]}/none"
    with RunningApi(api_settings(url, token=TOKEN)) as api, \
            httpx.Client(base_url=api.url, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "not_ready"
        stats = http.get("/stats/top-domains", headers={"Authorization": f"Bearer {TOKEN}"})
        assert stats.status_code == 503
        assert stats.json()["error"]["code"] == "database_unavailable"


class Forwarder:
    """A TCP forwarder from a fixed loopback port to the database, started on demand."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> None:
        async def listen() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def test_the_api_recovers_when_the_database_comes_back(database_url: str) -> None:
    target = httpx.URL(database_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = database_url.replace(f":{target.port}/", f":{port}/")
    forwarder = Forwarder(port, (target.host, target.port or 5432))
    try:
        with RunningApi(api_settings(url)) as api, \
                httpx.Client(base_url=api.url, timeout=10) as http:
            assert http.get("/readyz").status_code == 503
            forwarder.start()
            deadline = time.monotonic() + 20
            while http.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the API did not reconnect"
                time.sleep(0.05)  # polling with a deadline: the reconnect is not awaitable
            assert http.get("/stats/statuses").status_code == 200
    finally:
        forwarder.stop()
