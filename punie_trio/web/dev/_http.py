"""HTTP rules for static serving, as pure functions (sans-I/O, unit-tested one by one).

Request paths, ``Range``, conditional requests (``If-None-Match`` / ``If-Modified-Since`` /
``If-Range``), ``Accept-Encoding`` and content types. No function here touches the disk or
the network, so each rule is tested on strings.
"""

from __future__ import annotations

import email.utils
import mimetypes
import re
import urllib.parse
from typing import Final

import attrs

#: Types that mimetypes gets wrong or not at all on some systems; checked first. (It
#: reads the machine's tables over its built-in one: without /etc/mime.types, a slim
#: container, ``.xhtml`` and the fonts were application/octet-stream; Debian's says a
#: ``.ts`` video segment is Qt Linguist text.)
_TYPES: Final[dict[str, str]] = {
    ".html": "text/html",
    ".htm": "text/html",
    ".xhtml": "application/xhtml+xml",
    ".css": "text/css",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".xml": "application/xml",
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".wasm": "application/wasm",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".otf": "font/otf",
    ".ttf": "font/ttf",
    ".ts": "video/mp2t",  # an HLS segment (a TypeScript source is not served to run)
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".ogv": "video/ogg",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/vnd.microsoft.icon",
    ".pdf": "application/pdf",
}

#: What a compressed file is sent as: the compression's own type, never the inner file's. A
#: ``bundle.js.gz`` is gzip bytes; labelled ``text/javascript`` without ``Content-Encoding``
#: (what it was) a browser runs the compressed bytes as a script, and with ``Content-Encoding``
#: a download would be decompressed behind the user's back. Python's ``http.server`` does
#: the same for ``.gz``, ``.bz2``, ``.xz`` and ``.Z``; brotli has no registered type, so a
#: ``.br`` file is plain binary, as ``.Z`` is there. The names ``mimetypes`` knows as
#: compressed (``.tgz``, ``.svgz``, ...) count by their compression too.
_COMPRESSED: Final[dict[str, str]] = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/octet-stream",
    "br": "application/octet-stream",
}

_COMPRESSIBLE_APP: Final = frozenset(
    {
        "application/json",
        "application/javascript",
        "application/xml",
        "application/wasm",
        "image/svg+xml",
        "image/vnd.microsoft.icon",
    }
)


#: How far into a page the charset declaration is looked for: the HTML spec's prescan reads
#: the first 1024 bytes, and so does :func:`content_type`.
SNIFF_BYTES = 1024

_BOMS: Final = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16le"), (b"\xfe\xff", "utf-16be"))
#: The Encoding Standard's labels of UTF-16LE and UTF-16BE.
_UTF16_LABELS: Final = frozenset(
    {"csunicode", "iso-10646-ucs-2", "ucs-2", "unicode", "unicodefeff", "utf-16", "utf-16le"}
    | {"unicodefffe", "utf-16be"}
)
_XML_TYPES: Final = frozenset({"application/xml", "text/xml", "application/xhtml+xml"})
#: An encoding label fit for a header: no quotes, no ``;``, no spaces (labels are tokens).
_LABEL = re.compile(rb"[A-Za-z0-9._:+-]{1,40}")
_XML_DECL = re.compile(rb"<\?xml\s[^>]*?encoding\s*=\s*[\"']([^\"']*)[\"']")
#: A stylesheet's ``@charset`` rule, as CSS Syntax 3.2 reads it: these exact bytes at the
#: very start, the label in double quotes.
_CSS_CHARSET = re.compile(rb'@charset "([\x00-\x21\x23-\x7f]*)";')
_ATTR = re.compile(
    rb"[\t\n\f\r /]*([^\t\n\f\r />][^\t\n\f\r /=>]*)(?:[\t\n\f\r ]*=[\t\n\f\r ]*"
    rb"(\"[^\"]*\"?|'[^']*'?|[^\t\n\f\r >]*))?"
)
_CONTENT_CHARSET = re.compile(
    rb"charset[\t\n\f\r ]*=[\t\n\f\r ]*(\"[^\"]*\"|'[^']*'|[^\t\n\f\r ;\"']+)", re.I
)


def _label(raw: bytes) -> str | None:
    raw = raw.strip(b"\t\n\f\r \"'")
    if not _LABEL.fullmatch(raw):
        return None
    label = raw.decode("ascii").lower()
    # The spec's prescan: a page that says it is UTF-16 in ASCII bytes is not (it would have
    # a BOM), so UTF-16 labels mean UTF-8; x-user-defined means windows-1252.
    if label in _UTF16_LABELS:
        return "utf-8"
    if label == "x-user-defined":
        return "windows-1252"
    return label


def _attributes(tag: bytes) -> list[tuple[bytes, bytes]]:
    """The attributes of a start tag's inside (after its name, up to ``>``)."""
    out = []
    for match in _ATTR.finditer(tag):
        value = match.group(2) or b""
        if value[:1] in (b'"', b"'"):
            value = value[1:].rstrip(value[:1])
        out.append((match.group(1).lower(), value))
    return out


def _tag_end(data: bytes, start: int) -> int:
    """Index just past the ``>`` that ends the tag opened before ``start`` (quotes
    respected), or ``len(data)``."""
    i, quote = start, 0
    while i < len(data):
        c = data[i]
        if quote:
            if c == quote:
                quote = 0
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x3E:
            return i + 1
        i += 1
    return len(data)


def prescan(head: bytes) -> str | None:
    """The charset an HTML page declares in its first :data:`SNIFF_BYTES` bytes, as the HTML
    spec's prescan finds it: the first ``<meta charset>`` or ``<meta http-equiv=content-type
    content="...; charset=...">`` outside comments, skipping other tags whole (a ``>`` or a
    ``<meta`` inside a quoted attribute value does not count)."""
    data = head[:SNIFF_BYTES]
    i = 0
    while True:
        i = data.find(b"<", i)
        if i < 0:
            return None
        if data.startswith(b"<!--", i):
            end = data.find(b"-->", i + 2)
            if end < 0:
                return None
            i = end + 3
            continue
        after = data[i + 5 : i + 6]
        if data[i : i + 5].lower() == b"<meta" and after and after in b"\t\n\f\r /":
            end = _tag_end(data, i + 5)
            attrs = dict(reversed(_attributes(data[i + 5 : end].rstrip(b">"))))
            charset = attrs.get(b"charset")
            if charset is None:
                content = attrs.get(b"content")
                equiv = attrs.get(b"http-equiv", b"").lower()
                found = _CONTENT_CHARSET.search(content) if content is not None else None
                charset = found.group(1) if found is not None and equiv == b"content-type" else None
            if charset is not None:
                label = _label(charset)
                if label is not None:
                    return label
            i = end
            continue
        nxt = data[i + 1 : i + 2]
        if nxt.isalpha() or (nxt == b"/" and data[i + 2 : i + 3].isalpha()):
            i = _tag_end(data, i + 1)
        elif nxt in (b"!", b"/", b"?"):
            end = data.find(b">", i + 1)
            if end < 0:
                return None
            i = end + 1
        else:
            i += 1


def bom_charset(head: bytes) -> str | None:
    """The encoding a byte-order mark at the start of ``head`` names (it beats any label)."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    return None


def content_type(name: str, head: bytes = b"") -> str:
    """The ``Content-Type`` for a file name whose content starts with ``head``.

    Text types carry a charset, which overrides what the document itself declares (a page with
    ``<meta charset="iso-8859-1">`` sent with ``charset=utf-8`` showed "Caf\ufffd cr\ufffdme";
    found by a dev app audit). So it is the document's own: a byte-order mark; for HTML the
    ``<meta>`` declaration the browser's prescan would find (:func:`prescan`); for XML the
    ``encoding`` of its declaration; for CSS its ``@charset "...";`` rule (CSS Syntax 3.2:
    UTF-16 labels mean UTF-8 there too); else ``utf-8``.

    A compressed file (``.gz``, ``.br``, ...) gets its compression's type (see
    :data:`_COMPRESSED`), which is not compressible, so it is never gzipped again either.
    """
    dot = name.rfind(".")
    suffix = name[dot:].lower() if dot >= 0 else ""
    ctype = _TYPES.get(suffix)
    if ctype is None:
        guessed, encoding = mimetypes.guess_type(name, strict=False)
        if encoding is not None:
            return _COMPRESSED.get(encoding, "application/octet-stream")
        ctype = guessed or "application/octet-stream"
    if (
        ctype.startswith("text/")
        or ctype in ("application/json", "application/xml")
        or (ctype == "application/xhtml+xml")
    ):
        charset = bom_charset(head)
        if charset is None and ctype == "text/html":
            charset = prescan(head)
        elif charset is None and ctype in _XML_TYPES:
            found = _XML_DECL.match(head)
            charset = _label(found.group(1)) if found is not None else None
        elif charset is None and ctype == "text/css":
            found = _CSS_CHARSET.match(head)
            charset = _label(found.group(1)) if found is not None else None
        ctype += "; charset=" + (charset or "utf-8")
    return ctype


def charset(ctype: str) -> str | None:
    """The ``charset`` parameter of a ``Content-Type`` we made."""
    _, sep, value = ctype.partition("; charset=")
    return value if sep else None


def is_html(ctype: str) -> bool:
    """A page that gets the live-reload script: HTML, or XHTML (see :func:`is_xhtml`)."""
    return ctype.split(";", 1)[0].strip() in ("text/html", "application/xhtml+xml")


def is_xhtml(ctype: str) -> bool:
    """A page parsed as XML: the script may only go where it keeps it well-formed."""
    return ctype.split(";", 1)[0].strip() == "application/xhtml+xml"


def is_compressible(ctype: str) -> bool:
    """Worth gzipping: text and text-like types. Never ``text/event-stream`` (it streams)."""
    base = ctype.split(";", 1)[0].strip().lower()
    if base == "text/event-stream":
        return False
    return base.startswith("text/") or base in _COMPRESSIBLE_APP


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (explicitly or via ``*``) with q > 0."""
    if not accept_encoding:
        return False
    star: bool | None = None
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q > 0
    return bool(star)


def safe_segments(path: str) -> list[str] | None:
    """Split a decoded request path into segments, or ``None`` if it must be refused.

    Refused: any segment starting with a dot (``..`` and ``.`` traversal, hidden files such as
    ``.git`` or ``.env``), backslashes and NUL bytes. Empty segments (``a//b``) are skipped.
    The caller still resolves symlinks and checks the result stays inside the site.
    """
    if not path.startswith("/"):
        return None
    segments = []
    for segment in path.split("/"):
        if not segment:
            continue
        if segment.startswith(".") or "\\" in segment or "\x00" in segment:
            return None
        segments.append(segment)
    return segments


#: What a query keeps as it is in a Location: printable ASCII (escapes, reserved characters).
_QUERY_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F))


def directory_location(path: str, query: bytes) -> bytes:
    """The ``Location`` that sends a directory's path (no trailing slash) to ``dir/``.

    Built from the path's segments, so it is a path on this server (a request for
    ``//evil.example.com``, a directory of the site, was sent to ``//evil.example.com/``,
    which a browser reads as another host). The query is kept byte for byte, but for what
    a header may not carry raw: a space, a control, a byte past ASCII (HTTP/2 lets a client
    send those) is percent-encoded; it was decoded as Latin-1 and encoded as UTF-8, so
    ``?q=\xc3\xa9`` came back as ``?q=\xc3\x83\xc2\xa9``.
    """
    segments = [urllib.parse.quote(segment) for segment in path.split("/") if segment]
    location = ("/" + "/".join(segments) + "/").encode()
    if query:
        location += b"?" + urllib.parse.quote_from_bytes(query, safe=_QUERY_SAFE).encode()
    return location


def make_etag(size: int, mtime_ns: int, variant: str = "") -> str:
    """A strong validator from size and mtime, plus a variant (generation, encoding)."""
    tag = f"{size:x}-{mtime_ns:x}"
    if variant:
        tag += "-" + variant
    return f'"{tag}"'


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison of ``If-None-Match`` against our ETag (``*`` matches anything)."""
    value = if_none_match.strip()
    if value == "*":
        return True
    return any(_opaque(tag) == _opaque(etag) for tag in value.split(","))


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def parse_http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp()


def not_modified(
    *,
    etag: str,
    mtime: float,
    if_none_match: str | None,
    if_modified_since: str | None,
) -> bool:
    """RFC 9110 section 13.2.2: ``If-None-Match`` wins; otherwise ``If-Modified-Since``."""
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        # HTTP dates have whole seconds: compare at that precision.
        return since is not None and int(mtime) <= int(since)
    return False


@attrs.frozen
class ByteRange:
    """An inclusive byte range ``start``..``end`` of a body of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


@attrs.frozen
class Unsatisfiable:
    """A syntactically valid range that selects nothing: answer 416."""

    size: int

    def content_range(self) -> str:
        return f"bytes */{self.size}"


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit() alone takes "²", which int() refuses


def _byte_pos(digits: str) -> int:
    """A byte position; past 18 digits it is beyond any file (and int() of thousands of
    digits would raise), so it reads as 10**18."""
    return int(digits) if len(digits) <= 18 else 10**18


def parse_range(value: str, size: int) -> ByteRange | Unsatisfiable | None:
    """Parse a ``Range`` header for a body of ``size`` bytes.

    Returns a :class:`ByteRange` (206), :class:`Unsatisfiable` (416), or ``None`` to ignore the
    header and send the whole body (invalid syntax, other units, or several ranges: RFC 9110
    lets a server ignore ``Range``, and one full body beats a multipart one for a dev server).
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not _is_digits(first)) or (last and not _is_digits(last)):
        return None
    if not first:
        if not last:
            return None
        suffix = _byte_pos(last)
        if suffix == 0 or size == 0:
            return Unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1, size)
    start = _byte_pos(first)
    end = _byte_pos(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return Unsatisfiable(size)
    return ByteRange(start, min(end, size - 1), size)


def if_range_allows(if_range: str | None, *, etag: str, last_modified: str) -> bool:
    """``If-Range``: honour ``Range`` only if the validator still matches (strong compare)."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return not value.startswith("W/") and value == etag
    return value == last_modified
