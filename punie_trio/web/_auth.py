"""Who may talk to the server: the bearer token, the browser Origin check and the Host check
(pure functions).

Cross-site WebSocket hijacking is the real risk of a localhost agent server: any web page the
user visits may open ``ws://127.0.0.1:8765/acp``. Browsers always send ``Origin`` on WebSocket
handshakes, so a foreign one is refused even before the token is looked at.

DNS rebinding is the other: a page at ``http://evil.example:8765`` whose name the attacker
then points at 127.0.0.1 is, to the browser, same-origin with the server, so it could read
every response (the dev app's site, ``/health``) and would pass an Origin check that trusts
``Host``. Its requests carry ``Host: evil.example:8765``, though, so only names that cannot be
rebound are accepted: IP addresses, ``localhost`` and its subdomains (RFC 6761), and the ones
the user lists (``--allow-host``).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from .._paths import replace_file
from ._http import header, shown_header


def bearer_token(scope: dict[str, Any]) -> str | None:
    """The token of a request: ``Authorization: Bearer T``, else ``?token=T`` (browsers
    cannot set headers on a WebSocket handshake)."""
    auth = header(scope, b"authorization")
    if auth is not None:
        scheme, _, value = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


def token_matches(scope: dict[str, Any], expected: str) -> bool:
    given = bearer_token(scope)
    # compare_digest: the time taken does not depend on how much of the token was right.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def unauthorized(scope: dict[str, Any], needs: str) -> str:
    """The reason of a 401: ``needs`` (what the request lacked) when it carried no token;
    when it carried a wrong one, that it did. Both once said "needs the server token", so a
    client holding a stale token (a generated one changes at each start) read that it had
    sent none. The token sent is never echoed."""
    if bearer_token(scope) is None:
        return f"Unauthorized: {needs}"
    return (
        "Unauthorized: the token sent is not this server's (a generated token changes at "
        "each start; `punie-trio token` shows the current one)"
    )


def challenge(scope: dict[str, Any]) -> bytes:
    """The ``WWW-Authenticate`` value of a 401 for this request: the bare Bearer challenge
    when it carried no token, and ``error="invalid_token"`` when it carried a wrong one
    (RFC 6750 section 3.1)."""
    if bearer_token(scope) is None:
        return b'Bearer realm="punie-trio"'
    return b'Bearer realm="punie-trio", error="invalid_token"'


def origin_allowed(scope: dict[str, Any], allowed: tuple[str, ...]) -> bool:
    """No Origin (a non-browser client), the server's own origin, or an allowed one."""
    origin = header(scope, b"origin")
    if origin is None:
        return True
    text = origin.decode("latin-1").rstrip("/").lower()
    host = header(scope, b"host")
    if host is not None:
        own = host.decode("latin-1").lower()
        if text in (f"http://{own}", f"https://{own}"):
            return True
    return text in {a.rstrip("/").lower() for a in allowed}


def write_token_file(path: Path) -> str:
    """Generate a token and write it to ``path`` with mode 0600 (created that way, never
    readable by others even for an instant), replacing any previous one."""
    token = secrets.token_urlsafe(32)
    replace_file(path, (token + "\n").encode(), 0o600)
    return token


def _host_name(text: str) -> str | None:
    """The host name in a ``Host`` value (lowercase, stripped): without its port or a final
    dot, an IPv6 address without its brackets; None if the value is malformed."""
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    elif text.count(":") > 1:
        # An IPv6 address without its brackets (RFC 3986 section 3.2.2 requires them; no
        # browser sends one): splitting it at its last colon named the host ':' for ::1.
        return None
    else:
        name, _, port = text.partition(":")
    if port and not port.isdigit():
        # Not a port: no host at all (the name in ``127.0.0.1:evil.example`` is not
        # 127.0.0.1).
        return None
    return name.rstrip(".")


def request_host(scope: dict[str, Any]) -> str | None:
    """The ``Host`` header's host name as a refusal names it: lowercase, without its port or
    a final dot (an IPv6 address without its brackets), read as UTF-8 (``shown_header``:
    Latin-1 named ``bücher.example`` ``bã¼cher.example``); None without the header. A
    malformed value comes back whole (``::1``, ``[::1``), which only ``*`` accepts.

    Lowercased (and stripped) in ASCII alone, as the bytes: only ASCII can match a name
    (:func:`host_allowed`), and lowercased as Unicode, a KELVIN SIGN came back as ``k``
    (``Host: \u212aube.example`` refused as 'kube.example' under ``--allow-host
    kube.example``, leaving nothing to allow) and an I with a dot as ``i`` and a
    combining dot."""
    value = header(scope, b"host")
    if value is None:
        return None
    text = shown_header(value.strip().lower())
    name = _host_name(text)
    return text if name is None else name


def host_allowed(scope: dict[str, Any], allowed: tuple[str, ...]) -> bool:
    """Whether the request's ``Host`` is one a rebinding page cannot send: no header (not a
    browser), an IP address, ``localhost`` or a ``.localhost`` name, or one of ``allowed``
    (exact names; ``.example.com`` also admits its subdomains; ``*`` admits every name,
    and is the only one to admit a malformed value)."""
    value = header(scope, b"host")
    if value is None:
        return True
    name = _host_name(value.decode("latin-1").strip().lower())
    if name is None:
        return "*" in allowed
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if "%" in name:  # an IPv6 zone id (or percent-encoding): nothing a browser sends
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return True
    for pattern in allowed:
        if pattern == "*" or name == pattern.lstrip("."):
            return True
        if pattern.startswith(".") and name.endswith(pattern):
            return True
    return False
