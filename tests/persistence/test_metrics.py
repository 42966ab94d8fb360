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

from prometheus_client.parser import text_string_to_metric_families

from punie_trio.hub import Limits, Manager
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ._hub import initialize, open_hub, prompt_params
from .test_reconnect import open_raw_session, send_unread


def scraped(manager: Manager) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The manager's ``/metrics`` exposition as Prometheus parses it, by (name, labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(manager.metrics.render().decode())
        for s in family.samples
    }


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
