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

:func:`loads` is the other direction for text from outside (a frame, a line, an HTTP body):
strict JSON only, with every way it can fail a ``ValueError``.
"""

from __future__ import annotations

import json
import json.encoder
import math
import re
import sys
from collections.abc import Callable
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape_lone_surrogates(text: str) -> str:
    """A JSON text with any lone surrogate written as its ``\\uXXXX`` escape (inside a
    JSON text a surrogate can only stand in a string, where the escape means the same), so
    the text encodes as UTF-8 (see the module docstring)."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, text)
    return text


_NOT_NAME_TEXT = re.compile("[\x00\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate: valid in a JSON string, but no UTF-8 text."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def is_name_text(text: str) -> bool:
    """Whether ``text`` could be a path or an identifier: no NUL (the OS refuses it) and no
    lone surrogate (the file system and the store speak UTF-8). Prompt and model text may
    hold a surrogate: it is only carried, escaped."""
    return _NOT_NAME_TEXT.search(text) is None


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
        return lambda value: escape_lone_surrogates(stdlib.encode(value))
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
            return escape_lone_surrogates(json.encoder.encode_basestring(value))
        return escape_lone_surrogates("".join(encode(value, 0)))

    return dumps


#: Compact text, non-ASCII kept, NaN/Infinity written as JavaScript would (as ``json.dumps``).
dumps = _encoder(allow_nan=True)
#: The same, but NaN and infinities raise ``ValueError`` (strict JSON, for the store).
dumps_strict = _encoder(allow_nan=False)


_NON_FINITE_KEYS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _finite_key(key: Any) -> Any:
    # (A key is written as a string anyway: as the lenient encoder spelled it.)
    if isinstance(key, float) and not math.isfinite(key):
        return _NON_FINITE_KEYS[repr(key)]
    return key


def _finite_copy(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None; iterative, so a value nested
    as deep as the encoder takes is copied too (recursion ran out at half that depth)."""
    holder: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(value, holder, 0, 0)]
    deepest = sys.getrecursionlimit()  # (a cycle would never end: as deep as json goes)
    while stack:
        item, into, key, depth = stack.pop()
        copy: Any
        if depth > deepest and isinstance(item, dict | list | tuple):
            raise RecursionError("nested too deeply (or circular) to encode")
        if isinstance(item, dict):
            copy = {}
            for name, member in item.items():
                name = _finite_key(name)
                copy[name] = None  # (the order of the keys, filled in below)
                stack.append((member, copy, name, depth + 1))
        elif isinstance(item, list | tuple):
            copy = [None] * len(item)
            stack.extend((member, copy, i, depth + 1) for i, member in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            copy = None
        else:
            copy = item
        into[key] = copy
    return holder[0]


def dumps_finite(value: Any) -> str:
    """Strict JSON text of ``value``, with any NaN or infinity written as ``null``.

    For text that goes on the wire and into the store (a ``session/update``): a model that
    puts a NaN in a tool call's input must not produce a line a client cannot parse, nor a
    stored entry that later reads as damaged. The copy is made only when the fast strict
    encoding fails."""
    try:
        return dumps_strict(value)
    except ValueError:
        return dumps_strict(_finite_copy(value))


def kind(value: Any) -> str:
    """What JSON calls ``value``'s type, with its article: "null", "a boolean", "a number",
    "a string", "an array", "an object" (a value :func:`loads` gave).

    Why: a refusal naming the type a client sent said Python's name for it ("got
    NoneType", "got bool", "got dict"), which a client written in TypeScript or Rust
    has never heard of."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # (not from JSON)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range for a double")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # past sys.get_int_max_str_digits(): Python's message names a call
        digits = len(text.lstrip("-"))
        limit = sys.get_int_max_str_digits()
        raise ValueError(
            f"integer {text[:20]}... has {digits:,} digits; at most {limit:,} are read"
        ) from None


_STRICT_DECODER = json.JSONDecoder(
    parse_constant=_no_constant, parse_float=_finite, parse_int=_integer
)


#: The decoder's C scanner: one JSON value at an index, returning it and where it ended.
_SCAN: Callable[[str, int], tuple[Any, int]] = _STRICT_DECODER.scan_once  # type: ignore[attr-defined]


def is_object_text(text: str) -> bool:
    """Whether ``text`` is exactly one JSON object, read as strictly as :func:`loads`
    reads it, with no whitespace before it (what the store writes: compact JSON).

    Why not ``type(loads(text)) is dict``: this is the check of every transcript entry a
    ``session/load`` replays (19,000 for 1,000 turns), and ``loads`` pays for
    ``JSONDecoder.decode``'s Python wrappers and two whitespace regexes on top of the C
    scanner, about 40% of the check. False for anything else (the caller reads it again
    with :func:`loads` for the reason); never raises. Text accepted here :func:`loads`
    accepts too, as the same object.
    """
    try:
        value, end = _SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return False
    if end != len(text) and text[end:].strip(" \t\n\r"):
        return False  # (JSON's whitespace after the value is allowed, as loads allows it)
    return type(value) is dict


def without_bom(data: bytes) -> bytes:
    """``data`` without a leading UTF-8 byte-order mark (which JSON text may carry)."""
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def loads(text: str | bytes) -> Any:
    """``json.loads`` for text from outside; every failure is a ``ValueError``.

    Stricter than ``json.loads``: ``NaN``, ``Infinity`` and ``-Infinity`` (which it takes,
    though JSON has no such tokens) and numbers beyond a double (``1e400``, which it reads
    as infinity) are refused, so whatever is read can be written back as JSON. Nesting too
    deep for the parser's recursion (``[[[[...`` by the 100,000) is a ``ValueError`` here,
    not a ``RecursionError``. Bytes must be UTF-8 (the transports page: messages MUST be
    UTF-8), a leading byte-order mark aside: ``json.loads`` would also take UTF-16 and -32,
    and surrogates encoded as UTF-8, which RFC 3629 forbids (an audit had a UTF-32 prompt
    run). Anything else is a ``UnicodeDecodeError``, a ``ValueError``.
    """
    if not isinstance(text, str):
        text = without_bom(bytes(text)).decode("utf-8")
    try:
        return _STRICT_DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
