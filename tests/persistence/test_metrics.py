"""``/metrics`` as an operator of many IDEs reads it: the gauges follow every lifecycle
path of a session (drops kept within grace, grace expiry, a client back within grace,
close, delete, load, refusals, shutdown) back to the server's real state, each counter
counts each event once (an answer sent again on a client's return is not a second
error), and the exposition is valid Prometheus text that shows no token and no path.

The random lifecycles' version of the gauge checks is in ``test_races.py``
(``test_metrics_follow_random_lifecycles_on_the_hub``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from wsproto.events import AcceptConnection, Request

from punie_trio.hub import Limits, Manager
from punie_trio.web._heartbeat import PROBE_WITHIN
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..integration._support import settle_until, ws_url
from ..integration.conftest import StartServer
from ..integration.test_heartbeat import RawClient, settle
from ..unit.test_load import load_params
from ._hub import expect_error, initialize, open_hub, prompt_params
from .test_auth import TOKEN, acp_client, bearer, origin, rejected
from .test_reconnect import open_raw_session, send_unread

GAUGES = ("punie_connections", "punie_sessions", "punie_workers")


def _parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A ``/metrics`` exposition as Prometheus parses it (a malformed one raises), by
    (name, labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scraped(manager: Manager) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _parsed(manager.metrics.render().decode())


def new_params(cwd: str) -> dict[str, Any]:
    return {"cwd": cwd, "mcpServers": []}


def errors(manager: Manager, code: int) -> float:
    return sum(
        v
        for (name, labels), v in scraped(manager).items()
        if name == "punie_errors_total" and ("code", str(code)) in labels
    )


async def test_an_unwritten_error_answer_sent_on_the_clients_return_counts_once(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """An error answer queued for a connection that dropped before writing it is kept
    for the client's return and sent then, awaited: one error answer, counted once in
    ``punie_errors_total`` (it was counted as it was queued, and again as it was sent)."""
    async with open_hub(
        tmp_path, acp_schema, ScriptModel([]), limits=Limits(grace_seconds=60)
    ) as hub:
        raw, _ = await open_raw_session(hub, "ide")  # (a stream buffer of one)
        await send_unread(raw, "l", "session/list", {}, acp_schema)  # (fills the buffer)
        await send_unread(raw, "x", "nope/nope", {}, acp_schema)  # (its answer stays queued)
        assert errors(hub.manager, -32601) == 1
        await raw.aclose()
        await hub.settle()
        again = await hub.connect()
        await initialize(again.client, client_id="ide", awaiting=["x"])
        answer = await again.client.wait_for(lambda m: m.get("id") == "x")
        assert answer["error"]["code"] == -32601
        await hub.settle()
        assert errors(hub.manager, -32601) == 1


async def test_an_error_answer_lost_in_flight_and_sent_again_counts_once(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A prompt cancelled by ``$/cancel_request`` is answered -32800; the answer is
    written and lost in flight (the client drops unread), and sent again to the client
    back awaiting it: one error answer, counted once."""
    model = ScriptModel([[{"text": "a"}, {"sleep": 5}]])
    async with open_hub(tmp_path, acp_schema, model, limits=Limits(grace_seconds=60)) as hub:
        raw, session = await open_raw_session(hub, "ide", buffer=64)
        await send_unread(raw, "p", "session/prompt", prompt_params(session, "go"), acp_schema)
        cancel = {"jsonrpc": "2.0", "method": "$/cancel_request", "params": {"requestId": "p"}}
        await raw.send_message(json.dumps(cancel))
        await hub.settle()
        assert hub.manager.sessions[session].turn is None
        assert errors(hub.manager, -32800) == 1
        await raw.aclose()
        await hub.settle()
        again = await hub.connect()
        await initialize(again.client, client_id="ide", awaiting=["p"])
        answer = await again.client.wait_for(lambda m: m.get("id") == "p")
        assert answer["error"]["code"] == -32800
        await hub.settle()
        assert errors(hub.manager, -32800) == 1


async def raw_client(url: str, token: str) -> RawClient:
    """A WebSocket client that answers nothing by itself (no pongs), with the token."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    client = RawClient(await trio.open_tcp_stream(host, int(port)))
    await client.stream.send_all(client.ws.send(Request(host=host, target=f"/acp?token={token}")))
    while not any(isinstance(e, AcceptConnection) for e in client.events):
        client._take(await client.stream.receive_some(65536))
    return client


def with_id(client_id: str) -> dict[str, Any]:
    return {"protocolVersion": 1, "_meta": {"punie-trio/clientId": client_id}}


async def test_the_gauges_follow_every_lifecycle_path_on_a_real_server(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Scraped over HTTP after each step, ``punie_connections``, ``punie_sessions`` and
    ``punie_workers`` are what the server holds: refused requests (the sessions limit,
    the path policy, a load of a session open elsewhere) and refused upgrades (401, 403,
    503 full) change nothing; a load of a live session does not count it twice; close
    and delete take theirs away; a drop keeps the sessions within grace, a client back
    (also through the take-over of its half-open connection) takes them without a
    second count, the grace's end drops them; and the shutdown leaves nothing."""
    limits = Limits(grace_seconds=60, max_connections=3, max_sessions_per_connection=2)
    auth = [bearer(TOKEN)]

    async def gauges(http: httpx.AsyncClient) -> tuple[float, ...]:
        await settle()
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        got = _parsed(response.text)
        return tuple(got[(name, ())] for name in GAUGES)

    async with (
        start_server(limits=limits, token=TOKEN) as running,
        httpx.AsyncClient(base_url=str(running.url)) as http,
    ):
        assert running.url is not None
        url = ws_url(running.url)
        cwd = str(tmp_path)
        assert await gauges(http) == (0, 0, 0)
        async with acp_client(url, acp_schema, auth) as a:
            await a.request("initialize", with_id("ide"))
            first = await a.new_session(cwd)
            second = await a.new_session(cwd)
            assert await gauges(http) == (1, 2, 1)
            # Refused: a third session (the limit), a cwd outside the roots.
            assert (await expect_error(a, "session/new", new_params(cwd)))["code"] == -32600
            assert (await expect_error(a, "session/new", new_params("/")))["code"] == -32602
            # Loaded while live here: the same session, counted once.
            assert await a.request("session/load", load_params(first, tmp_path)) == {}
            assert await gauges(http) == (1, 2, 1)
            async with acp_client(url, acp_schema, auth) as b:
                await b.initialize()
                refused = await expect_error(b, "session/load", load_params(first, tmp_path))
                assert refused["code"] == -32600  # (open on another connection)
                assert await gauges(http) == (2, 2, 1)
                # Refused upgrades: no token, a foreign Origin, the server full.
                assert (await rejected(url)).status_code == 401
                evil = [origin("http://evil.example"), bearer(TOKEN)]
                assert (await rejected(url, evil)).status_code == 403
                async with acp_client(url, acp_schema, auth) as c:
                    await c.initialize()
                    assert (await rejected(url, auth)).status_code == 503
                    assert await gauges(http) == (3, 2, 1)
                assert await gauges(http) == (2, 2, 1)
            # Close, and delete.
            assert await a.request("session/close", {"sessionId": second}) == {}
            third = await a.new_session(cwd)
            assert await a.request("session/delete", {"sessionId": third}) == {}
            assert await gauges(http) == (1, 1, 1)
        # Dropped under a client id: its session is kept within grace.
        assert await gauges(http) == (0, 1, 1)
        # Back within grace, on a connection that then goes half-open.
        silent = await raw_client(running.url, TOKEN)
        await silent.send_json(
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": with_id("ide")}
        )
        await settle()
        assert running.manager.sessions[first].owner is not None
        assert await gauges(http) == (1, 1, 1)
        async with acp_client(url, acp_schema, auth) as back:
            await back.send(
                {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": with_id("ide")}
            )
            await settle()
            assert await gauges(http) == (2, 1, 1)  # (probing the silent one)
            mock_clock.jump(PROBE_WITHIN)
            await settle_until(lambda: any(m.get("id") == "init" for m in back.received))
            assert running.manager.sessions[first].owner in running.manager.connections
            assert await gauges(http) == (1, 1, 1)
        silent.peek.close()
        await silent.stream.aclose()
        assert await gauges(http) == (0, 1, 1)
        mock_clock.jump(limits.grace_seconds)  # (the grace period ends)
        assert await gauges(http) == (0, 0, 0)
        async with acp_client(url, acp_schema, auth) as d:
            await d.request("initialize", with_id("other"))
            await d.new_session(cwd)
            assert await gauges(http) == (1, 1, 1)
            running.closing.set()  # (shutdown, the client still connected)
            await settle_until(lambda: not running.manager.connections)
    assert _parsed(running.manager.metrics.render().decode())[("punie_sessions", ())] == 0
    got = _parsed(running.manager.metrics.render().decode())
    assert tuple(got[(name, ())] for name in GAUGES) == (0, 0, 0)


async def test_the_exposition_is_prometheus_text_without_tokens_or_paths(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """What a scraper gets: Prometheus text (parsed as Prometheus parses it), with its
    content type, for GET and HEAD (no body); 401 with a reason and a challenge without
    the token (with it, or public). Nothing a client sent shows in it: neither a token
    (right or wrong), nor a path, a method name or a prompt."""
    secret_dir = tmp_path / "secret-project-dir"
    secret_dir.mkdir()
    sent = ["wrong-token-7f3a", TOKEN * 3, "secret-project-dir", "x/secret-method", "secret-words"]
    async with (
        start_server(token=TOKEN * 3) as running,
        httpx.AsyncClient(base_url=str(running.url)) as http,
    ):
        url = ws_url(str(running.url))
        assert (await rejected(url, [bearer("wrong-token-7f3a")])).status_code == 401
        async with acp_client(url, acp_schema, [bearer(TOKEN * 3)]) as client:
            await client.initialize()
            session = await client.new_session(str(secret_dir))
            assert await client.prompt(session, "secret-words") == "end_turn"
            await expect_error(client, "x/secret-method", {})
            await expect_error(client, "session/new", new_params("/secret-project-dir/x"))
            await expect_error(client, "session/load", load_params("sess_x", secret_dir))
        unauthorized = await http.get("/metrics", params={"token": "wrong-token-7f3a"})
        assert unauthorized.status_code == 401
        assert "wrong-token-7f3a" not in unauthorized.text
        assert unauthorized.headers["www-authenticate"].startswith("Bearer ")
        auth = {"Authorization": f"Bearer {TOKEN * 3}"}
        response = await http.get("/metrics", headers=auth)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        got = _parsed(response.text)
        assert got[("punie_prompts_total", (("stop_reason", "end_turn"),))] == 1
        for text in sent:
            assert text not in response.text, text
        head = await http.head("/metrics", headers=auth)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == response.headers["content-type"]
        assert (await http.head("/metrics")).status_code == 401
