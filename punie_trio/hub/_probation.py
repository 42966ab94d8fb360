"""The connection limit, and the way back in at a full server: probation.

Every ACP connection counts against ``max_connections`` (the ``--stdio`` one too), and
so does a WebSocket upgrade accepted but not yet attached (:attr:`Manager.upgrading`), so
simultaneous handshakes cannot slip past the limit. Past it, an upgrade is refused with
HTTP 503 before anything of ACP is read, but for one case: a client coming back while the
server still counts its old connection, which a network flap or a laptop's resume left
half-open (the heartbeat drops such a connection only after 60-70 s of silence). Its
client id, the one thing that could let it take that connection's place, comes in
``initialize`` ``_meta``, after the upgrade: refused with 503, the IDE was locked out of
its own sessions for a minute, where a server with room lets it in at once (its
``initialize`` probes the old connection: ``Manager.take_over``).

So a full server lets at most :data:`MAX_ON_PROBATION` upgrades past the limit **on
probation** (:func:`admit_upgrade`), while some open connection holds a client id that a
probe could free (none does, or only the ``--stdio`` one or WebSockets over HTTP/2,
which nothing probes: 503 at once, as before). A connection on probation may do
one thing: send ``initialize`` naming a client id held by another open connection, which
is then probed. Found dead (dropped, or it closed meanwhile), that connection's place goes
to the one on probation as it detaches (:func:`promote`, from ``detach``: in the same
step, so no other upgrade can take it in between), and the ``initialize`` is answered as
at a server with room (the sessions re-attach). Anything else (no client id, one no
other connection holds, a holder that answers the probe, another connection taking the
id over, any other request first) is refused with -32600 ``Connection limit reached
(N): ...`` naming why (bad ``initialize`` params keep their -32602, the limit in front),
and the WebSocket is then closed with 1013 (Try Again Later, the IANA code for a server
casting off clients it has no room for) and ``connection limit reached (N)``; so is one
that sends no ``initialize`` within :data:`PROBATION_INITIALIZE_WITHIN`, with nothing to
answer. (At a shutdown the close is 1001, as for every connection.) A place that comes
free meanwhile (another client leaves) is taken instead: the connection is then one
like any other, and what it sends first is answered as anywhere (bad params, a request
before ``initialize``: the connection stays open).

So at most ``max_connections`` connections count against the limit and at most
:data:`MAX_ON_PROBATION` more are on probation; a client without a client id, or whose
old connection is alive, is refused as before (503, or the -32600 and 1013 above, if it
was let in on probation); two connections naming one id do not both win (one probes, the
other is refused: ``Manager._claims``).

These are :class:`~._manager.Manager` methods, defined here and bound in its class body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ..rpc import INVALID_REQUEST, RpcError

if TYPE_CHECKING:
    from ._connection import ClientConnection
    from ._manager import Manager

#: The most connections let in on probation past a full ``max_connections`` at once.
#: Small: each is a WebSocket the limit does not count (about 30 KiB), and a probation
#: lasts a round trip and a probe (5 s), so a few at once serve a user whose IDE windows
#: all come back after a resume; past it, 503 as before, and the IDE tries again.
MAX_ON_PROBATION = 4
#: How long a connection on probation has to send its ``initialize`` (seconds): a client
#: sends it as soon as its upgrade is answered. Silent, it is closed (1013), so that a
#: client that upgrades and says nothing cannot hold a probation place for the
#: heartbeat's 30 s.
PROBATION_INITIALIZE_WITHIN = 5.0


def has_room(self: Manager) -> bool:
    """Whether one more connection fits within ``max_connections``: those open but on
    probation are not counted, upgrades under way are."""
    counted = len(self.connections) - len(self.on_probation) + self.upgrading
    return counted < self.limits.max_connections


def admit_upgrade(self: Manager) -> Literal["counted", "probation"] | None:
    """Count a WebSocket upgrade the app is about to accept: ``"counted"`` within the
    limit, ``"probation"`` past it (see the module), or None to refuse it (503). The app
    calls :func:`upgraded` once it has accepted (or failed to), with no checkpoint
    between that and the connection's ``attach``."""
    if has_room(self):
        self.upgrading += 1
        return "counted"
    if self.alive is None or self.closing.is_set():
        return None  # (no probe can tell a connection dead here)
    if len(self.on_probation) + self.upgrading_on_probation >= MAX_ON_PROBATION:
        return None
    if not any(_probeable_holder(c) for c in self.connections):
        return None  # (no connection whose place a probe could free: refused as before)
    self.upgrading_on_probation += 1
    return "probation"


def probation_could_admit(self: Manager) -> bool:
    """Whether a full server lets upgrades in on probation at all (some open connection
    holds a client id a probe could free): if so, a 503 means that every place on
    probation is taken, and one is free again within a probation's length (its
    ``initialize``, then a probe); if not, only a place coming free lets a client in.
    (What the 503's ``Retry-After`` tells: ``web._app``.)"""
    return (
        self.alive is not None
        and not self.closing.is_set()
        and any(_probeable_holder(c) for c in self.connections)
    )


def _probeable_holder(conn: ClientConnection) -> bool:
    """Whether ``conn`` holds a client id that a probe could find dead and free. Not the
    ``--stdio`` connection, nor a WebSocket over HTTP/2: nothing pings them
    (``Heartbeat.alive`` takes them for alive), so with only such a connection holding
    an id (``--stdio --max-connections 1``) every upgrade was let in on probation only
    to be refused (-32600, 1013), where the 503 says it at once."""
    return conn.client_id is not None and conn.initialized and conn.probeable


def upgraded(self: Manager, admitted: Literal["counted", "probation"]) -> None:
    """An upgrade :func:`admit_upgrade` counted is accepted (or failed): it is counted
    from now on by its connection (``attach``), or not at all."""
    if admitted == "counted":
        self.upgrading -= 1
    else:
        self.upgrading_on_probation -= 1


def promote(self: Manager, conn: ClientConnection) -> None:
    """``conn`` is on probation no more: it counts against ``max_connections`` from now
    on (it took the place of a connection found dead, or a place came free)."""
    conn.on_probation = False
    self.on_probation.discard(conn)


def limit_reached(self: Manager, why: str) -> RpcError:
    """The error a connection on probation is refused with (-32600), saying ``why``."""
    return RpcError(
        INVALID_REQUEST,
        f"Connection limit reached ({self.limits.max_connections}): {why}",
    )


def close_reason(self: Manager, why: str | None = None) -> tuple[int, str]:
    """The WebSocket close (code, reason) of a connection refused on probation; ``why``
    (short: a close reason is at most 123 bytes) follows the limit if given."""
    reason = f"connection limit reached ({self.limits.max_connections})"
    return 1013, reason if why is None else f"{reason}: {why}"
