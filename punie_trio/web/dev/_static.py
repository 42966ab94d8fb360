"""Static files of the site directory, with the live-reload script in every HTML page.

Resource handling: no file is read on the event loop. A request that is not in the cache costs
**one** worker-thread hop, which resolves the path (containment, symlinks), stats the file and,
for a file up to :data:`CACHE_FILE_LIMIT`, reads it whole in the same hop. Larger files are read
in a thread per read: whole up to :data:`WHOLE_FILE_LIMIT`, else in :data:`CHUNK` pieces, so
neither a slow disk nor a large file blocks other requests, and memory per request is bounded.

The cache: small files' bytes (and what is derived from them: the injected page for the current
page state, the gzipped body, validators) are kept, keyed by the request path, LRU-bounded by
:data:`CACHE_ENTRIES` and :data:`CACHE_BYTES`. An entry is used only while one ``stat()`` of the
requested path (symlinks followed; on the event loop on a local disk, a metadata call, no
read; in a thread on a network mount, ``_mounts.may_hang``) still shows the same file:
device, inode, size, ``mtime_ns`` and ``ctime_ns``. Any write, replace (rename), truncation
or re-link changes one of those, and the request then takes the thread hop again. So a
cache hit on a local disk costs no thread hop at all, and a changed file is never served
stale (down to the file system's timestamp granularity, the limit ETags share).

HTML is read whole (it must be, to inject the script), up to :data:`INJECT_LIMIT`; a larger
page is served as is.

Security: the request path is split into segments and refused if any starts with a dot
(:func:`._http.safe_segments`); the resolved file (symlinks followed) must still be inside
the site directory. A cache hit is the same inode that check accepted, unchanged since (a
rename or a new link changes its ``ctime``); a path whose symlinks now lead elsewhere stats as
another file and is checked again.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import os
import stat
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, TypeVarTuple

import attrs
import trio

from ..._threads import RootNotAnswering, run_sync_under, site_key
from . import _asgi, _http
from ._asgi import Headers, Send, finish, respond, start
from ._inject import inject

log = logging.getLogger("punie_trio.dev")

CHUNK = 256 * 1024
WHOLE_FILE_LIMIT = 1024 * 1024
INJECT_LIMIT = 16 * 1024 * 1024
GZIP_MIN = 256
GZIP_MAX = 8 * 1024 * 1024
#: Files up to this size are read in the lookup's thread hop and kept in the cache.
CACHE_FILE_LIMIT = 1024 * 1024
#: Bounds of the file cache (bodies plus their variants), LRU.
CACHE_ENTRIES = 1024
CACHE_BYTES = 64 * 1024 * 1024
#: Variants (injected page per page state, gzipped bodies) kept per cached file.
VARIANTS_PER_FILE = 4
#: Compressed bodies of files too large for the cache, keyed by (path, size, mtime): LRU.
GZIP_CACHE_ENTRIES = 64
GZIP_CACHE_BYTES = 32 * 1024 * 1024

#: A body to a peer that has gone is ended with zeros in pieces of this size (see
#: :func:`_end_for_departed`).
FILLER = bytes(CHUNK)
PIECE = 64 * 1024

#: What identifies one version of one file: device, inode, size, mtime_ns, ctime_ns.
Identity = tuple[int, int, int, int, int]
#: What identifies the site directory a lookup resolved: device, inode.
RootIdentity = tuple[int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@attrs.define(eq=False)
class Lookup:
    """What a request path names. For a small file, also its bytes and identity (cacheable)."""

    kind: Literal["file", "redirect", "missing"]
    path: str = ""
    size: int = 0
    mtime_ns: int = 0
    #: The whole content, read in the lookup's hop (files up to the read limit), else None.
    body: bytes | None = None
    #: Identity of the file ``body`` was read from; None: not cacheable.
    ident: Identity | None = None
    #: The path as requested (symlinks not resolved), which a cache hit stats again.
    target: str = ""
    last_modified: str = ""
    #: The cache key (normalised request path) once the entry is cached.
    key: str = ""
    #: Bodies derived from a cached file, by variant (page state, encoding).
    variants: dict[str, bytes] = attrs.field(factory=dict)
    #: ``Content-Type``: from the name and, for text, the charset the content declares
    #: (worked out in the lookup's hop, from the first :data:`~._http.SNIFF_BYTES` bytes).
    ctype: str = "application/octet-stream"
    #: The site directory the lookup resolved, which a cache hit checks is still current.
    root: RootIdentity | None = None
    #: A large file's identity as the lookup found it (the gzip cache's key: size and
    #: mtime alone took a file rewritten with both kept, as ``cp -p`` does, for the old).
    version: Identity | None = None

    @property
    def cost(self) -> int:
        """Bytes this entry keeps in memory."""
        return len(self.body or b"") + sum(len(body) for body in self.variants.values())


_MISSING = Lookup("missing")
_REDIRECT = Lookup("redirect")


def _inside(real: str, root: str) -> bool:
    """Whether the resolved path ``real`` is the resolved site directory ``root`` or in it."""
    return real == root or real.startswith(root + os.sep)


def lookup(site: str, segments: list[str], trailing_slash: bool, read_limit: int = -1) -> Lookup:
    """Find the file for a request and, if it has at most ``read_limit`` bytes, read it.

    Blocking: run it in a thread. One call does the containment check, the stat and the read.

    ``site`` is the site directory as named (absolute). It is resolved here, on every
    lookup, not once at start: a site that is a symlink a build re-points (``nix build``'s
    ``./result``) must be served from where it leads now (an audit: the output of the start
    stayed served for ever). The containment check is against that current target, so a
    link *inside* it that leads out is still refused.
    """
    target = os.path.join(site, *segments)
    try:
        root = os.path.realpath(site)
        root_st = os.stat(root)
        real = os.path.realpath(os.path.join(root, *segments))
        if not _inside(real, root):
            return _MISSING
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            if not trailing_slash and segments:
                return _REDIRECT
            # Resolved and checked again: an index.html that is a link out of the site was
            # served for "/" and "dir/" (a review), though refused by its own name.
            real = os.path.realpath(os.path.join(real, "index.html"))
            if not _inside(real, root):
                return _MISSING
            target = os.path.join(target, "index.html")
            st = os.stat(real)
        elif trailing_slash:
            return _MISSING
        if not stat.S_ISREG(st.st_mode):
            return _MISSING
        if st.st_size > read_limit:
            return Lookup(
                "file",
                real,
                st.st_size,
                st.st_mtime_ns,
                target=target,
                last_modified=_http.http_date(st.st_mtime_ns / 1e9),
                ctype=_http.content_type(real, _read(real, 0, _http.SNIFF_BYTES)),
                root=(root_st.st_dev, root_st.st_ino),
                version=identity(st),
            )
        with open(real, "rb") as f:
            st = os.fstat(f.fileno())
            body = f.read()
    except OSError:
        return _MISSING
    # The identity is taken from the open file; a file that changed size while we read it is
    # served as read, but not cached.
    ident = identity(st) if len(body) == st.st_size else None
    return Lookup(
        "file",
        real,
        len(body),
        st.st_mtime_ns,
        body,
        ident,
        target,
        _http.http_date(st.st_mtime_ns / 1e9),
        ctype=_http.content_type(real, body[: _http.SNIFF_BYTES]),
        root=(root_st.st_dev, root_st.st_ino),
    )


def _read(path: str, offset: int = 0, length: int = -1) -> bytes:
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read(length)


@attrs.define(eq=False)
class _Chunks:
    """A large file's descriptor, read in pieces (``os.pread``), each in a thread that may
    be abandoned on cancel.

    Why not ``trio.open_file``: its reads cannot be abandoned, so on a site that stopped
    answering (a network mount) a download held the server's shutdown until it answered.

    Resource handling: the descriptor is closed once, by whichever ends last of the
    response (:meth:`close`, idempotent) and a thread still in :meth:`open` or
    :meth:`read`. Closing it under an abandoned read would free its number for the next
    ``open()`` or ``accept()``, and a read not yet in the kernel could then take that
    file's (or socket's) bytes."""

    fd: int | None = None
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _busy: bool = False
    _closing: bool = False

    def open(self, path: str) -> None:
        """(In a thread.) Open ``path``; closed at once if :meth:`close` came first."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            if not self._closing:
                self.fd = fd
                return
        os.close(fd)

    def read(self, offset: int, size: int) -> bytes:
        """(In a thread.) Up to ``size`` bytes at ``offset``; ``b""`` past the end."""
        with self._lock:
            if self._closing or self.fd is None:
                return b""
            self._busy, fd = True, self.fd
        try:
            return os.pread(fd, size, offset)
        finally:
            if self._done_reading():  # closed meanwhile: the last one out closes it
                os.close(fd)

    def _done_reading(self) -> bool:
        with self._lock:
            self._busy = False
            return self._closing

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            fd = None if self._busy else self.fd
        if fd is not None:
            os.close(fd)


def _unchanged(cached: Lookup, site: str) -> bool:
    """Whether a cached lookup's file is still the one it read: one ``stat()`` of the path
    (symlinks followed) and one of the site directory. The site too: re-pointed (a
    symlink), the file may be the same but reached from another tree, where containment
    must be checked again."""
    try:
        current = identity(os.stat(cached.target))
        root = os.stat(site)
    except OSError:
        return False
    return current == cached.ident and (root.st_dev, root.st_ino) == cached.root


_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


class Vanished(Exception):
    """The file a lookup found could not be read before its response started: it was
    deleted (or replaced by something unreadable) since. Answer as for a missing file."""


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=6, mtime=0)


def _gzip_file(path: str, version: Identity) -> tuple[bytes, bool]:
    """Gzip a file read in :data:`CHUNK` pieces (its whole content is never held); whether
    the result is the file of that identity, unchanged while it was read (cacheable).
    Blocking: run it in a thread."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: the gzip format, mtime 0
    parts = []
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        while chunk := f.read(CHUNK):
            parts.append(compressor.compress(chunk))
        after = os.fstat(f.fileno())
    parts.append(compressor.flush())
    return b"".join(parts), identity(before) == identity(after) == version


async def _end_for_departed(send: Send, remaining: int) -> None:
    """End a response whose peer has gone, without reading or computing the rest of it.

    Why zeros and not just stopping: Hypercorn ends a response cut short by closing the
    connection, and while pipelined requests wait behind it its reader stays paused for good
    (the connection's task then lived until shutdown). The declared length is therefore
    made up with zeros, which go nowhere: the socket is closed (``write_failed``) or
    Hypercorn drops sends on a closed stream. The next request on the connection is then
    refused at once, which closes the connection (see ``DevApp._serve``)."""
    while remaining > len(FILLER):
        await send({"type": "http.response.body", "body": FILLER, "more_body": True})
        remaining -= len(FILLER)
    await finish(send, FILLER[:remaining])


async def _send_in_pieces(
    send: Send,
    status: int,
    headers: Headers,
    body: bytes,
    gone: Callable[[], bool],
    *,
    head: bool = False,
) -> None:
    """A complete response whose body is in memory (none for HEAD, as :func:`respond`), in
    :data:`PIECE` pieces when large.

    Why pieces: a peer that stops reading holds the write that waits for its socket, and
    with it (punie-trio's writer keeps what the kernel did not take) up to the rest of that
    write; a body over :data:`CHUNK` goes one piece at a time, so a stalled connection
    holds at most about that much (a 500-connection audit: 1.2 GB, now about 110 MB). Between
    pieces, a peer that has gone (``gone``) ends the response (:func:`_end_for_departed`).
    """
    if head or len(body) <= CHUNK:  # most bodies: whole, as before (fewer sends)
        await respond(send, status, headers, body, head=head)
        return
    await start(send, status, headers)
    offset = 0
    while len(body) - offset > PIECE:
        if gone():
            await _end_for_departed(send, len(body) - offset)
            return
        piece = body[offset : offset + PIECE]
        await send({"type": "http.response.body", "body": piece, "more_body": True})
        offset += PIECE
    await finish(send, body[offset:])


@attrs.define(eq=False)
class StaticSite:
    """Serves ``site_dir``; HTML pages get the script for the state ``page_state()`` returns."""

    site_dir: Path
    #: The site directory as named (absolute, symlinks not resolved: see :func:`lookup`).
    _site: str = attrs.field(init=False)
    _cache: collections.OrderedDict[str, Lookup] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _cache_bytes: int = attrs.field(init=False, default=0)
    _gzip_cache: collections.OrderedDict[tuple[str, Identity], bytes] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _gzip_cache_bytes: int = attrs.field(init=False, default=0)
    #: Compressions running, by gzip cache key: a request for the same file waits for the
    #: one running instead of compressing the file again.
    _gzipping: dict[tuple[str, Identity], trio.Event] = attrs.field(init=False, factory=dict)
    #: Large-file compressions done (a test hook, and a figure for benchmarks).
    compressions: int = attrs.field(init=False, default=0)
    #: Lookups that took the thread hop (cache misses); hits take none.
    misses: int = attrs.field(init=False, default=0)
    #: The last page state seen, with its JSON and tag: it changes once per build, not per
    #: request, so a request compares three values instead of serialising them.
    _state_memo: tuple[dict[str, Any], str, str] = attrs.field(init=False, default=({}, "", ""))

    #: Whether the site lies on a file system that may stop answering (``_mounts.may_hang``,
    #: set by the dev app at start): then a cache hit's ``stat()`` takes a thread too.
    remote: bool = attrs.field(init=False, default=False)
    #: The site's thread slots (``_threads.site_key``): every thread of this class's file
    #: work takes one, so a hung site holds at most :data:`_threads.SITE_THREADS` threads.
    _key: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._site = os.path.abspath(self.site_dir)
        self._key = site_key(self._site)

    async def in_thread(
        self, fn: Callable[[*_Args], _T], *args: *_Args, abandon_on_cancel: bool = True
    ) -> _T:
        """``fn(*args)`` in one of the site's threads, abandoned on cancel unless told
        otherwise: a read changes nothing, and on a site that stopped answering (a network
        mount) a request's read held the server's shutdown until the file system answered,
        past ``shutdown_timeout`` (the watchdog then ended the process with status 1). The
        thread ends when the file system answers. Raises ``_threads.RootNotAnswering`` when
        every slot has been busy for ``_threads.ROOT_WAIT`` seconds (a 503)."""
        return await run_sync_under(self._key, fn, *args, abandon_on_cancel=abandon_on_cancel)

    async def _read_found(self, read: Callable[[*_Args], _T], *args: *_Args) -> _T:
        """``read(*args)`` in a thread (:meth:`in_thread`), for a file a lookup found but
        did not read (too large): an ``OSError`` is :class:`Vanished`.

        Why: a build that empties its output first (Vite's ``emptyOutDir``, Hugo's
        ``--cleanDestinationDir``) deletes files between the lookup and this read, and the
        ``FileNotFoundError`` left the app: a 500, and "Error in ASGI Framework" with a
        traceback in the terminal.

        Abandoned on cancel (:meth:`in_thread`), the compression of a large file too
        (:meth:`_gzipped`)."""
        try:
            return await self.in_thread(read, *args)
        except OSError as exc:
            raise Vanished(str(exc)) from exc

    @property
    def cached(self) -> int:
        """Files in the cache."""
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        return self._cache_bytes

    async def find(self, request_path: str) -> Lookup:
        """What ``request_path`` names: from the cache when its file is unchanged (one
        ``stat()``, no thread hop), else from :func:`lookup` in a thread."""
        segments = _http.safe_segments(request_path)
        if segments is None:
            return _MISSING
        trailing = request_path.endswith("/")
        key = "/".join(segments) + ("/" if trailing and segments else "")
        cached = self._cache.get(key)
        if cached is not None:
            if self.remote:  # (see _mounts: a stat there may wait on another machine)
                unchanged = await self.in_thread(_unchanged, cached, self._site)
            else:
                unchanged = _unchanged(cached, self._site)
            if unchanged:
                if self._cache.get(key) is cached:  # (not replaced during a thread's stat)
                    self._cache.move_to_end(key)
                return cached
            if self._cache.get(key) is cached:
                self._forget(key)
        self.misses += 1
        found = await self.in_thread(lookup, self._site, segments, trailing, CACHE_FILE_LIMIT)
        if found.ident is not None:
            self._forget(key)  # a concurrent miss for the same path may have stored one
            found.key = key
            self._cache[key] = found
            self._cache_bytes += found.cost
            self._trim()
        return found

    def _forget(self, key: str) -> None:
        dropped = self._cache.pop(key, None)
        if dropped is not None:
            self._cache_bytes -= dropped.cost

    def _trim(self) -> None:
        while self._cache and (len(self._cache) > CACHE_ENTRIES or self._cache_bytes > CACHE_BYTES):
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= dropped.cost

    def _remember(self, found: Lookup, variant: str, body: bytes) -> None:
        """Keep a derived body of a cacheable file (at most VARIANTS_PER_FILE of them)."""
        if found.ident is None:
            return
        before = found.cost
        if len(found.variants) >= VARIANTS_PER_FILE:
            found.variants.clear()  # older page states: pages ask for the newest one
        found.variants[variant] = body
        if self._cache.get(found.key) is found:
            self._cache_bytes += found.cost - before
            self._trim()

    async def read_html(self, name: str) -> bytes | None:
        """A page at the site root (e.g. ``404.html``), or ``None``."""
        found = await self.find("/" + name)
        if found.kind != "file" or found.size > INJECT_LIMIT:
            return None
        if found.body is not None:
            return found.body
        try:
            return await self.in_thread(_read, found.path)
        except OSError:
            return None

    async def _gzipped(self, found: Lookup) -> bytes:
        """Gzip of a file too large for the file cache, kept in its own small LRU.

        Each version of a file is compressed once: a request finds it in the cache, or
        waits for the compression of it that is running. (An audit: 500 connections asking
        for one 2.7 MB file at once each read it whole and compressed it, 1.2 GB of RSS; and
        every later request read it whole before looking in the cache.) The compression
        reads the file in pieces (:func:`_gzip_file`); a waiter holds nothing."""
        assert found.version is not None  # (a large file's lookup)
        key = (found.path, found.version)
        while True:
            cached = self._gzip_cache.get(key)
            if cached is not None:
                self._gzip_cache.move_to_end(key)
                return cached
            running = self._gzipping.get(key)
            if running is None:
                break
            await running.wait()  # then the cache has it, unless the file changed meanwhile
        done = self._gzipping[key] = trio.Event()
        try:
            # Abandoned on cancel, as a read: once it was not, so that the requests
            # waiting for it got its result, and on a site that stopped answering it held
            # the server's shutdown until the file system answered. Hypercorn cancels a
            # request only at shutdown (not when its peer leaves); the waiters, woken
            # below, then start their own compression, unless cancelled too.
            compressed, cacheable = await self._read_found(_gzip_file, found.path, found.version)
            self.compressions += 1
        finally:
            del self._gzipping[key]
            done.set()
        if not cacheable:
            return compressed
        self._gzip_cache[key] = compressed
        self._gzip_cache_bytes += len(compressed)
        while len(self._gzip_cache) > GZIP_CACHE_ENTRIES or (
            self._gzip_cache_bytes > GZIP_CACHE_BYTES and len(self._gzip_cache) > 1
        ):
            _, dropped = self._gzip_cache.popitem(last=False)
            self._gzip_cache_bytes -= len(dropped)
        return compressed

    async def _page(self, found: Lookup, state: dict[str, Any]) -> tuple[bytes, str, str]:
        """(injected page, its state's variant tag, memo key) for the current page state."""
        memo_state, state_json, tag = self._state_memo
        if state != memo_state or not state_json:
            state_json = json.dumps(state, sort_keys=True)
            tag = f"{zlib.crc32(state_json.encode()):08x}"
            self._state_memo = (state, state_json, tag)
        body = found.variants.get(state_json)
        if body is None:
            raw = found.body
            if raw is None:
                raw = await self._read_found(_read, found.path)
            charset = _http.charset(found.ctype)
            body = inject(raw, state, charset, xml=_http.is_xhtml(found.ctype))
            self._remember(found, state_json, body)
        return body, tag, state_json

    async def serve_file(
        self,
        found: Lookup,
        request: dict[str, str],
        send: Send,
        *,
        head: bool,
        state: dict[str, Any],
        gone: Callable[[], bool] = _asgi.never,
    ) -> None:
        """Answer GET/HEAD for an existing file: conditionals, ranges, gzip, injection.

        ``request`` holds the relevant request headers (lower-case names, decoded). ``gone``
        tells whether the peer has left (:func:`._asgi.departed`): a large body stops being
        read or sent then.

        Raises :class:`Vanished`, with nothing sent, when a file too large for the lookup
        to have read is gone by the time it is read.
        """
        ctype = found.ctype
        html = _http.is_html(ctype) and found.size <= INJECT_LIMIT
        compressible = _http.is_compressible(ctype)
        body = found.body
        variant = memo_key = ""
        size = found.size
        if html:
            body, variant, memo_key = await self._page(found, state)
            size = len(body)
        use_gzip = (
            compressible
            and "range" not in request
            and GZIP_MIN <= size <= GZIP_MAX
            and _http.accepts_gzip(request.get("accept-encoding"))
        )
        if use_gzip:
            variant = variant + "-gz" if variant else "gz"
            memo_key += "|gz"
        etag = _http.make_etag(found.size, found.mtime_ns, variant)
        # A page's body also holds the page state it embeds, which changes without its file:
        # its date would say "not modified" of a page that changed (If-Modified-Since gave
        # 304 once the generation moved; found by a dev app audit). The ETag covers both.
        last_modified = "" if html else found.last_modified
        headers: Headers = [(b"etag", etag.encode())]
        if last_modified:
            headers.append((b"last-modified", last_modified.encode()))
        headers.append((b"cache-control", b"no-store" if html else b"no-cache"))
        if compressible:
            headers.append((b"vary", b"accept-encoding"))
        if _http.not_modified(
            etag=etag,
            mtime=found.mtime_ns / 1e9,
            if_none_match=request.get("if-none-match"),
            if_modified_since=None if html else request.get("if-modified-since"),
        ):
            await respond(send, 304, headers, b"")
            return
        headers.append((b"content-type", ctype.encode()))
        if use_gzip:
            body = await self._compressed(found, body, memo_key)
            headers += [(b"content-encoding", b"gzip"), (b"content-length", b"%d" % len(body))]
            await _send_in_pieces(send, 200, headers, body, gone, head=head)
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
            if length != len(body):
                body = body[offset : offset + length]
            await _send_in_pieces(send, status, headers, body, gone, head=head)
        elif head:
            await respond(send, status, headers, b"", head=True)
        elif length <= WHOLE_FILE_LIMIT:
            await respond(
                send,
                status,
                headers,
                await self._read_found(_read, found.path, offset, length),
            )
        else:
            await self._stream(found.path, offset, length, status, headers, send, gone)

    async def _compressed(self, found: Lookup, body: bytes | None, memo_key: str) -> bytes:
        """The gzipped body: memoised on a cached file, else via the large-file gzip cache."""
        compressed = found.variants.get(memo_key)
        if compressed is not None:
            return compressed
        if body is None:  # a file too large for the cache
            return await self._gzipped(found)
        compressed = await trio.to_thread.run_sync(_gzip, body)
        self._remember(found, memo_key, compressed)
        return compressed

    async def _stream(
        self,
        path: str,
        offset: int,
        length: int,
        status: int,
        headers: Headers,
        send: Send,
        gone: Callable[[], bool],
    ) -> None:
        """Send a large file chunk by chunk; each read is a thread hop, so others keep going,
        abandoned on cancel (:class:`_Chunks`). Once the peer has gone, the file is no longer
        read (:func:`_end_for_departed`). A read that finds every thread of the site busy
        for ``ROOT_WAIT`` seconds (a site that stopped answering) or that fails (``EIO``,
        ``ESTALE``) cuts the body short, as a file that shrank does (:meth:`_end_short`)."""
        chunks = _Chunks()
        try:
            try:
                await self.in_thread(chunks.open, path)
            except OSError as exc:  # deleted since the lookup (see _read_found)
                raise Vanished(str(exc)) from exc
            await start(send, status, headers)
            remaining = length
            try:
                while remaining > 0:
                    if gone():
                        chunks.close()
                        await _end_for_departed(send, remaining)
                        return
                    try:
                        chunk = await self.in_thread(
                            chunks.read, offset + length - remaining, min(CHUNK, remaining)
                        )
                    except (RootNotAnswering, OSError) as exc:
                        # (OSError: EIO from a soft NFS mount that stopped answering or a
                        # failing disk, ESTALE from a file replaced on another NFS client.
                        # It left the app: an ERROR with its traceback, then h11's.)
                        log.warning(
                            "%s could not be read while it was being sent (%d of %d bytes "
                            "sent): %s",
                            path,
                            length - remaining,
                            length,
                            exc,
                        )
                        await self._end_short(send, length - remaining, length)
                        return
                    if not chunk:
                        await self._cut_short(path, length - remaining, length, send)
                        return
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
        finally:
            chunks.close()

    async def _cut_short(self, path: str, sent: int, length: int, send: Send) -> None:
        """End a streamed body whose file shrank under it (a build rewriting a large asset
        while a browser downloads it: ``open(..., "w")`` truncates first).

        The body cannot reach the ``Content-Length`` already sent, and padding it would pass
        off other bytes as the file. So the connection is closed (:func:`._asgi.abort`), the
        client sees a short body, which it must not take for the file, and reloads it once
        the build is done; the declared length is then made up with zeros that go nowhere,
        as for a peer that left, so Hypercorn's bookkeeping of the connection completes. It
        used to end the response short: h11 raised, an ERROR with its traceback. Where the
        connection cannot be closed that way (HTTP/2, stock Hypercorn), the body is ended
        short, which an HTTP/2 client must treat as a malformed response (RFC 9113
        8.1.1)."""
        log.warning(
            "%s changed while it was being sent (%d of %d bytes sent): the response is cut short",
            path,
            sent,
            length,
        )
        await self._end_short(send, sent, length)

    @staticmethod
    async def _end_short(send: Send, sent: int, length: int) -> None:
        """End a started body that cannot reach its ``Content-Length`` (see
        :meth:`_cut_short`): the connection is closed, else (HTTP/2) the body ended short."""
        if await _asgi.abort(send):
            await _end_for_departed(send, length - sent)
        else:
            await finish(send)
