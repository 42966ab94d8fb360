"""Static files of the site directory, with the live-reload script in every HTML page.

Resource handling: every filesystem call runs in a worker thread (one hop for the lookup,
one per read), and files above :data:`WHOLE_FILE_LIMIT` are sent in :data:`CHUNK` pieces, so
neither a slow disk nor a large file blocks other requests, and memory per request is bounded.
HTML is read whole (it must be, to inject the script), up to :data:`INJECT_LIMIT`; a larger
page is served as is.

Security: the request path is split into segments and refused if any starts with a dot
(:func:`._http.safe_segments`); the resolved file (symlinks followed) must still be inside
the site directory.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from . import _http
from ._asgi import Headers, Send, finish, respond, start
from ._inject import inject

CHUNK = 256 * 1024
WHOLE_FILE_LIMIT = 1024 * 1024
INJECT_LIMIT = 16 * 1024 * 1024
GZIP_MIN = 256
GZIP_MAX = 8 * 1024 * 1024
#: Compressed bodies of non-HTML files kept, keyed by (path, size, mtime): LRU, bounded.
GZIP_CACHE_ENTRIES = 64
GZIP_CACHE_BYTES = 32 * 1024 * 1024


@attrs.frozen
class Lookup:
    kind: Literal["file", "redirect", "missing"]
    path: str = ""
    size: int = 0
    mtime_ns: int = 0


def lookup(root: str, segments: list[str], trailing_slash: bool) -> Lookup:
    """Find the file for a request (blocking: run in a thread)."""
    target = os.path.join(root, *segments)
    try:
        real = os.path.realpath(target)
        if real != root and not real.startswith(root + os.sep):
            return Lookup("missing")
        st = os.stat(real)
        if os.path.isdir(real):
            if not trailing_slash and segments:
                return Lookup("redirect")
            real = os.path.join(real, "index.html")
            st = os.stat(real)
        elif trailing_slash:
            return Lookup("missing")
        if not os.path.isfile(real):
            return Lookup("missing")
    except (FileNotFoundError, NotADirectoryError, PermissionError, OSError):
        return Lookup("missing")
    return Lookup("file", real, st.st_size, st.st_mtime_ns)


def _read(path: str, offset: int = 0, length: int = -1) -> bytes:
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read(length)


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=6, mtime=0)


@attrs.define(eq=False)
class StaticSite:
    """Serves ``site_dir``; HTML pages get the script for the state ``page_state()`` returns."""

    site_dir: Path
    _root: str = attrs.field(init=False)
    _gzip_cache: collections.OrderedDict[tuple[str, int, int], bytes] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _gzip_cache_bytes: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._root = os.path.realpath(self.site_dir)

    async def find(self, request_path: str) -> Lookup:
        segments = _http.safe_segments(request_path)
        if segments is None:
            return Lookup("missing")
        return await trio.to_thread.run_sync(
            lookup, self._root, segments, request_path.endswith("/")
        )

    async def read_html(self, name: str) -> bytes | None:
        """A page at the site root (e.g. ``404.html``), or ``None``."""
        found = await trio.to_thread.run_sync(lookup, self._root, [name], False)
        if found.kind != "file" or found.size > INJECT_LIMIT:
            return None
        try:
            return await trio.to_thread.run_sync(_read, found.path)
        except OSError:
            return None

    async def _gzipped(self, found: Lookup, body: bytes) -> bytes:
        key = (found.path, found.size, found.mtime_ns)
        cached = self._gzip_cache.get(key)
        if cached is not None:
            self._gzip_cache.move_to_end(key)
            return cached
        compressed = await trio.to_thread.run_sync(_gzip, body)
        self._gzip_cache[key] = compressed
        self._gzip_cache_bytes += len(compressed)
        while len(self._gzip_cache) > GZIP_CACHE_ENTRIES or (
            self._gzip_cache_bytes > GZIP_CACHE_BYTES and len(self._gzip_cache) > 1
        ):
            _, dropped = self._gzip_cache.popitem(last=False)
            self._gzip_cache_bytes -= len(dropped)
        return compressed

    async def serve_file(
        self,
        found: Lookup,
        request: dict[str, str],
        send: Send,
        *,
        head: bool,
        state: dict[str, Any],
    ) -> None:
        """Answer GET/HEAD for an existing file: conditionals, ranges, gzip, injection.

        ``request`` holds the relevant request headers (lower-case names, decoded).
        """
        ctype = _http.content_type(found.path)
        html = _http.is_html(ctype) and found.size <= INJECT_LIMIT
        body: bytes | None = None
        variant = ""
        size = found.size
        if html:
            body = inject(await trio.to_thread.run_sync(_read, found.path), state)
            size = len(body)
            state_key = zlib.crc32(json.dumps(state, sort_keys=True).encode())
            variant = f"{state_key:08x}"
        use_gzip = (
            _http.is_compressible(ctype)
            and _http.accepts_gzip(request.get("accept-encoding"))
            and "range" not in request
            and GZIP_MIN <= size <= GZIP_MAX
        )
        if use_gzip:
            variant = variant + "-gz" if variant else "gz"
        etag = _http.make_etag(found.size, found.mtime_ns, variant)
        mtime = found.mtime_ns / 1e9
        last_modified = _http.http_date(mtime)
        headers: Headers = [
            (b"etag", etag.encode()),
            (b"last-modified", last_modified.encode()),
            (b"cache-control", b"no-store" if html else b"no-cache"),
        ]
        if _http.is_compressible(ctype):
            headers.append((b"vary", b"accept-encoding"))
        if _http.not_modified(
            etag=etag,
            mtime=mtime,
            if_none_match=request.get("if-none-match"),
            if_modified_since=request.get("if-modified-since"),
        ):
            await respond(send, 304, headers, b"")
            return
        headers.append((b"content-type", ctype.encode()))
        if use_gzip:
            if body is None:
                body = await trio.to_thread.run_sync(_read, found.path)
                body = await self._gzipped(found, body)
            else:
                body = await trio.to_thread.run_sync(_gzip, body)
            headers += [(b"content-encoding", b"gzip"), (b"content-length", b"%d" % len(body))]
            await respond(send, 200, headers, body, head=head)
            return
        headers.append((b"accept-ranges", b"bytes"))
        status, offset, length = 200, 0, size
        range_header = request.get("range")
        if range_header is not None and _http.if_range_allows(
            request.get("if-range"), etag=etag, last_modified=last_modified
        ):
            parsed = _http.parse_range(range_header, size)
            if isinstance(parsed, _http.Unsatisfiable):
                headers += [(b"content-range", parsed.content_range().encode())]
                headers += [(b"content-length", b"0")]
                await respond(send, 416, headers, b"", head=head)
                return
            if parsed is not None:
                status, offset, length = 206, parsed.start, parsed.length
                headers.append((b"content-range", parsed.content_range().encode()))
        headers.append((b"content-length", b"%d" % length))
        if body is not None:
            await respond(send, status, headers, body[offset : offset + length], head=head)
        elif head:
            await respond(send, status, headers, b"", head=True)
        elif length <= WHOLE_FILE_LIMIT:
            await respond(
                send,
                status,
                headers,
                await trio.to_thread.run_sync(_read, found.path, offset, length),
            )
        else:
            await self._stream(found.path, offset, length, status, headers, send)

    async def _stream(
        self, path: str, offset: int, length: int, status: int, headers: Headers, send: Send
    ) -> None:
        """Send a large file chunk by chunk; each read is a thread hop, so others keep going."""
        async with await trio.open_file(path, "rb") as f:
            await f.seek(offset)
            await start(send, status, headers)
            remaining = length
            try:
                while remaining > 0:
                    chunk = await f.read(min(CHUNK, remaining))
                    if not chunk:
                        break  # the file shrank under us; the client sees a short body
                    remaining -= len(chunk)
                    if remaining > 0:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    else:
                        await finish(send, chunk)
                        return
            except BaseException:
                await finish(send)
                raise
            await finish(send)
