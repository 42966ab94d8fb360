"""A site on a file system that stops answering (a network mount) must not stall the server.

The dev app's file work takes threads of the site's own (``_threads.site_key``), so a hung
site holds at most ``SITE_THREADS`` of them; a request that finds them all busy for
``ROOT_WAIT`` seconds is a 503 naming the site. On a network or FUSE mount
(``_mounts.may_hang``) the shortcuts taken on the event loop (a cache hit's ``stat()``,
a small site's snapshot) take a thread too. Large files are read in pieces that a cancel
may abandon (``_static._Chunks``).

"Hangs" is a worker thread blocked on a ``threading.Event`` (as the kernel blocks a call on
a mount that stopped answering), released by the test; time is Trio's autojump clock where
a test waits for ``ROOT_WAIT``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from devsupport import running, write

from punie_trio import _mounts, _threads
from punie_trio.web.dev import DevApp, _app, _static
from punie_trio.web.dev._broadcast import Broadcaster
from punie_trio.web.dev._builder import BuildLoop
from punie_trio.web.dev._static import StaticSite, _Chunks
from punie_trio.web.dev._watch import PendingChanges

PLAIN = {"accept-encoding": "identity"}

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 27 0:40 / /home/u/remote rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
41 40 0:41 / /home/u/remote/local\\040disk rw - ext4 /dev/sdb1 rw
42 27 0:42 / /mnt/box rw,nosuid - fuse.sshfs u@box:/ rw
43 27 0:43 / /home/u/remote2 rw - tmpfs tmpfs rw
44 27 0:44 / /mnt/box rw - xfs /dev/sdc1 rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/home/u/project/site", "ext4"),  # under / only
        ("/", "ext4"),
        ("/home/u/remote", "nfs4"),  # the mount point itself
        ("/home/u/remote/site", "nfs4"),
        ("/home/u/remote/local disk/site", "ext4"),  # mounted inside the NFS mount
        ("/home/u/remote2/site", "tmpfs"),  # a prefix of the text is not a parent
        ("/mnt/box/site", "xfs"),  # mounted over: the later line wins
        ("/proc/self", "proc"),
    ],
)
def test_mount_type_is_the_longest_containing_mount_point(path: str, expected: str) -> None:
    assert _mounts.mount_type(path, MOUNTINFO) == expected


def test_may_hang_names_network_and_fuse_types_and_assumes_so_when_it_cannot_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _mounts.mount_type("/x", "garbage\n\n1 2 3\n") is None
    types = {"nfs4": True, "cifs": True, "fuse.sshfs": True, "fuseblk": True, "9p": True}
    types |= {"ext4": False, "xfs": False, "btrfs": False, "tmpfs": False, "overlay": False}
    for fs_type, hangs in types.items():
        monkeypatch.setattr(_mounts, "mount_type", lambda path, text, t=fs_type: t)
        assert _mounts.may_hang(tmp_path) is hangs, fs_type
    monkeypatch.undo()
    if os.path.exists("/proc/self/mountinfo"):  # (this machine's tmp is a local disk)
        assert _mounts.may_hang(tmp_path) is False
    real_open = open

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == "/proc/self/mountinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert _mounts.may_hang(tmp_path) is True


@pytest.mark.parametrize(
    "fs_type", ["virtiofs", "vboxsf", "prl_fs", "vmhgfs", "autofs", "beegfs", "orangefs"]
)
def test_may_hang_names_vm_shared_folders_and_automounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fs_type: str
) -> None:
    """A site in a VM's shared folder (virtiofs, VirtualBox's vboxsf, Parallels' prl_fs,
    VMware's vmhgfs), answered by a daemon or the host, or under an automount point that
    mounts on first use, counted as a local disk: its cache hits' ``stat()`` ran on the
    event loop, where one that waited on the host froze every client of the server."""
    monkeypatch.setattr(_mounts, "mount_type", lambda path, text: fs_type)
    assert _mounts.may_hang(tmp_path) is True


OVERLAYS = """\
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 27 0:40 / /net/share rw,relatime - nfs4 server:/export rw,vers=4.2
50 27 0:50 / /srv/site rw,relatime - overlay overlay rw,lowerdir=/opt/base:/net/share/\
layer,upperdir=/var/up/u,workdir=/var/up/w
51 27 0:51 / /srv/local rw,relatime - overlay overlay rw,lowerdir=/opt/base,upperdir=/var/u\
p/u,workdir=/var/up/w
52 27 0:52 / /srv/deep rw,relatime - overlay overlay rw,lowerdir=/srv/site/x,upperdir=/var/\
u,workdir=/var/w
53 27 0:53 / /srv/up rw,relatime - overlay overlay rw,lowerdir=/opt/base,upperdir=/net/shar\
e/u,workdir=/net/share/w
54 27 0:54 / /srv/loop rw,relatime - overlay overlay rw,lowerdir=/srv/loop/l,upperdir=/srv/\
loop/u,workdir=/srv/loop/w
"""


@pytest.mark.parametrize(
    ("path", "hangs"),
    [
        ("/srv/site/index.html", True),  # a lower layer on NFS
        ("/srv/up/index.html", True),  # the upper layer on NFS
        ("/srv/deep/index.html", True),  # over an overlay over NFS
        ("/srv/local/index.html", False),  # every layer on a local disk
        ("/srv/loop/index.html", False),  # (its layers under itself: no endless look)
        ("/net/share/site", True),
        ("/home/site", False),
    ],
)
def test_an_overlay_over_a_network_mount_may_hang(path: str, hangs: bool) -> None:
    """An overlay (a container's root, a build sandbox) answers only as fast as its
    layers: one whose lower or upper layer lies on NFS waits on NFS. The type "overlay"
    alone counted as a local disk, so its cache hits' ``stat()`` ran on the event loop."""
    assert _mounts.hangs_on(path, OVERLAYS) is hangs


class Hang:
    """Makes a blocking function hang in its thread, once or every time, until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out: list[bool] = []
        self.calls = 0

    def wait(self) -> None:
        self.calls += 1
        self.entered.set()
        self.timed_out.append(not self.release.wait(timeout=10))


async def test_on_a_network_mount_a_cache_hit_stats_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache hit checks its file with one ``stat()``, which ran on the event loop: on a
    mount that stopped answering, that froze every client of the server until it answered.
    On such a mount (here: ``may_hang`` says so) it runs in a site thread: another request
    is answered while it hangs."""
    site = tmp_path / "site"
    write(site / "style.css", "a { color: red; }\n")
    write(site / "other.css", "b { color: red; }\n")
    monkeypatch.setattr(_app, "may_hang", lambda path: True)
    dev = DevApp(site_dir=site, project_root=tmp_path, closing=trio.Event(), no_watch=True)
    hang, target = Hang(), str(site / "style.css")
    real_stat = os.stat
    armed = False

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(path) == target and armed and not hang.entered.is_set():
            hang.wait()
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        assert dev.static.remote and dev.loop.remote
        assert (await client.get("/style.css", headers=PLAIN)).status_code == 200
        armed = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.get, "/style.css")  # (a cache hit: its stat hangs)
            await trio.to_thread.run_sync(hang.entered.wait)
            other = await client.get("/other.css", headers=PLAIN)
            assert other.text == "b { color: red; }\n"
            assert hang.timed_out == []  # (answered while the stat still hung)
            hang.release.set()
    assert hang.timed_out == [False]


def _hung_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, StaticSite, Hang, trio.CapacityLimiter]:
    """A site whose every lookup hangs in its thread until released: the site, its
    ``StaticSite``, the hang, and the site's thread slots."""
    site = tmp_path / "site"
    write(site / "index.html", "<p>x</p>")
    hang = Hang()
    real_lookup = _static.lookup

    def hung_lookup(*args: Any) -> Any:
        hang.wait()
        return real_lookup(*args)

    monkeypatch.setattr(_static, "lookup", hung_lookup)
    return site, StaticSite(site), hang, _threads.slots_for(_threads.site_key(site)).limiter


async def test_a_hung_site_holds_only_its_own_threads_then_gets_a_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """The dev app's threads took Trio's default limiter (40, shared with the build's
    start, the watcher's scans and name lookups): a hung site could take them all, and a
    request waited for a thread for ever. Now it takes at most ``SITE_THREADS`` slots of
    the site's own, and a request that waits ``ROOT_WAIT`` seconds for one is refused
    (``RootNotAnswering``: a 503 naming the site, below)."""
    site, static, hang, slots = _hung_site(tmp_path, monkeypatch)
    refused: list[BaseException] = []

    async def find_refused() -> None:
        with pytest.raises(_threads.RootNotAnswering) as caught:
            await static.find("/index.html")
        refused.append(caught.value)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(_threads.SITE_THREADS):
                nursery.start_soon(static.find, f"/page{i}.html")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(find_refused)
            await trio.testing.wait_all_tasks_blocked()
            assert (slots.borrowed_tokens, slots.statistics().tasks_waiting) == (
                _threads.SITE_THREADS,
                1,
            )
            assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
            mock_clock.jump(_threads.ROOT_WAIT)
            await trio.testing.wait_all_tasks_blocked()
            assert len(refused) == 1
            assert f"the file system of the site directory {site} is not answering: all " in str(
                refused[0]
            )
            assert f"all {_threads.SITE_THREADS} threads" in str(refused[0])
            assert hang.timed_out == []  # (all of that while the site still hung)
            nursery.cancel_scope.cancel()  # (abandons the hung lookups)
    finally:
        hang.release.set()


async def test_a_site_that_is_not_answering_gets_a_503_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    write(site / "index.html", "<p>x</p>")

    async def not_answering(self: StaticSite, path: str) -> Any:
        raise _threads.RootNotAnswering(_threads.site_key(self.site_dir), _threads.SITE_THREADS)

    monkeypatch.setattr(StaticSite, "find", not_answering)
    dev = DevApp(site_dir=site, project_root=tmp_path, closing=trio.Event(), no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/index.html")
        assert response.status_code == 503
        assert f"the file system of the site directory {site} is not answering" in response.text
        assert response.headers["retry-after"] == "30"
        assert (await client.head("/index.html")).status_code == 503
        assert (await client.get("/__reload__.js")).status_code == 200  # (the rest goes on)


async def test_on_a_network_mount_a_small_sites_snapshot_takes_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a build the output of a small site was snapshotted on the event loop (it
    reads files): on a mount that stopped answering, that froze the server."""
    from punie_trio.web.dev import _builder

    site = tmp_path / "site"
    write(site / "index.html", "<p>x</p>")

    def on_the_loop(*args: Any) -> Any:
        raise AssertionError("small_snapshot ran on the event loop")

    monkeypatch.setattr(_builder, "small_snapshot", on_the_loop)
    loop = BuildLoop(site, tmp_path, Broadcaster(), PendingChanges(), None, remote=True)
    await loop.prepare()
    write(site / "index.html", "<p>y</p>")
    await loop.cycle()
    assert "index.html" in loop._last_good


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _until_closed(count: int) -> bool:
    """(In a thread.) Whether the open descriptors are back to ``count`` within 10 s."""
    deadline = time.monotonic() + 10
    while _open_fds() != count and time.monotonic() < deadline:
        time.sleep(0.001)
    return _open_fds() == count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
async def test_a_large_files_descriptor_is_closed_once_after_an_abandoned_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file's reads may be abandoned on cancel; closing its descriptor under a read
    still in its thread would free the number for the next ``open()`` (or ``accept()``),
    whose bytes that read could then take. The last one out closes it, once."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"b" * 1000)
    before = _open_fds()
    chunks = _Chunks()
    chunks.open(str(path))
    assert chunks.read(10, 5) == b"bbbbb"
    hang = Hang()
    real_pread = os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        hang.wait()
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread)

    async def cancel_once_reading(scope: trio.CancelScope) -> None:
        await trio.to_thread.run_sync(hang.entered.wait)
        scope.cancel()

    with trio.CancelScope() as scope:  # (the response ends: its read is abandoned)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_once_reading, scope)
            await trio.to_thread.run_sync(chunks.read, 0, 5, abandon_on_cancel=True)
    assert scope.cancelled_caught
    chunks.close()
    chunks.close()  # (idempotent)
    fd = chunks.fd
    assert fd is not None
    os.fstat(fd)  # still open: the read is still in its thread
    hang.release.set()
    assert await trio.to_thread.run_sync(_until_closed, before)  # (as the read left)
    assert chunks.read(0, 5) == b""  # closed: nothing more is read
    # A close that comes before the open has finished: the open closes what it opened.
    late = _Chunks()
    late.close()
    late.open(str(path))
    assert late.fd is None and _open_fds() == before


async def test_a_build_whose_output_cannot_be_read_for_a_hung_site_does_not_end_the_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The snapshot after a build (and the look at where the site link leads) takes one of
    the site's threads. With all of them held by a hung site, it waited ``ROOT_WAIT`` and
    ``RootNotAnswering`` left the build loop, and so ``DevApp.run``, in the server's root
    nursery: the whole server ended, ACP sessions included. The build is reported, the
    output is compared at the next build that can read it, and the loop goes on."""
    site, static, hang, slots = _hung_site(tmp_path, monkeypatch)
    broadcaster = Broadcaster()
    build = f'"{sys.executable}" -c pass'
    loop = BuildLoop(site, tmp_path, broadcaster, PendingChanges(), build, remote=True)
    await loop.prepare()
    before = dict(loop._last_good)
    write(site / "index.html", "<p>y</p>")
    cycled = trio.Event()

    async def cycle() -> None:
        await loop.cycle()
        cycled.set()

    try:
        async with trio.open_nursery() as nursery:
            for i in range(_threads.SITE_THREADS):
                nursery.start_soon(static.find, f"/page{i}.html")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cycle)
            while not cycled.is_set():  # (the build runs, then each look waits for a thread)
                if slots.statistics().tasks_waiting:
                    mock_clock.jump(_threads.ROOT_WAIT)
                await trio.to_thread.run_sync(time.sleep, 0.001)
            assert hang.timed_out == []  # (all of that while the site still hung)
            nursery.cancel_scope.cancel()  # (abandons the hung lookups)
    finally:
        hang.release.set()
    assert broadcaster.status is not None and broadcaster.status.kind == "build_ok"
    assert loop._last_good == before  # (compared at the next build that can read it)
    assert f"the file system of the site directory {site} is not answering" in caplog.text
    await loop.cycle()  # (the site answers again: the change is found)
    assert broadcaster.generation == 1
