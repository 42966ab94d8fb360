"""Compact JSON text for the hot paths (every message sent, every transcript entry stored).

Why: ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` builds a
``JSONEncoder`` and then a C encoder on every call; for a message of a few hundred bytes
that setup costs more than the encoding (2.8 us against 1.0 us for a 150-byte update,
measured on the benchmark machine). The C encoders are built once here, with the same
settings, so the text is byte for byte what ``json.dumps`` with those arguments gives.

No circular-reference check (``check_circular=False``): every value encoded here came from
``json.loads`` or from this package's own builders. A cycle would end in ``RecursionError``.

One difference from ``json.dumps(..., ensure_ascii=False)``: a lone surrogate (a ``str``
that is not valid Unicode text, say from a model's badly decoded output) is written as its
``\\uXXXX`` escape instead of raw, so the text always encodes as UTF-8: on the wire, in the
store, everywhere. ``json.loads`` reads it back as the same string.
"""

from __future__ import annotations

import json
import json.encoder
import re
from collections.abc import Callable
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _utf8_safe(text: str) -> str:
    """``text`` with any lone surrogate replaced by its JSON escape (inside a JSON text a
    surrogate can only stand in a string, where the escape means the same)."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, text)
    return text


def without_surrogates(text: str) -> str:
    """``text`` with any lone surrogate replaced by U+FFFD, for a string that leaves JSON
    (a session title bound as an SQLite parameter must be valid UTF-8)."""
    return _SURROGATE.sub("\ufffd", text) if not text.isascii() else text


def _encoder(allow_nan: bool) -> Callable[[Any], str]:
    stdlib = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan, check_circular=False
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C accelerator
        return lambda value: _utf8_safe(stdlib.encode(value))
    encode = make(
        None,  # markers: no circular check
        stdlib.default,
        json.encoder.encode_basestring,  # ensure_ascii=False's string encoder
        None,  # indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        allow_nan,
    )

    def dumps(value: Any) -> str:
        if isinstance(value, str):  # the C encoder takes a bare string too; this is quicker
            return _utf8_safe(json.encoder.encode_basestring(value))
        return _utf8_safe("".join(encode(value, 0)))

    return dumps


#: Compact text, non-ASCII kept, NaN/Infinity written as JavaScript would (as ``json.dumps``).
dumps = _encoder(allow_nan=True)
#: The same, but NaN and infinities raise ``ValueError`` (strict JSON, for the store).
dumps_strict = _encoder(allow_nan=False)
