"""Run one peer dev server for the dev-app benchmarks. Executed by the *peer's* Python.

Usage: ``python _peer_server.py PEER PORT SITE [SRC]`` with PEER one of ``mkdocs``,
``sphinx-autobuild``, ``livereload``, ``bengal``. The server listens on 127.0.0.1:PORT (the
caller picks a free port and polls it until it answers). Without SRC it serves SITE and
reloads the browser when a file under SITE changes (no build command); with SRC it watches SRC
and, on a change, "builds" by copying SRC/index.html to SITE/index.html (the trivial build of
the benchmarks). The caller stops it with SIGTERM/SIGKILL.

How the build copies (``$PUNIE_BENCH_PEER_BUILD``): ``command`` (the default) runs the same
command as the DevApp's ``--build``, ``cp src/index.html site/index.html`` in the project
root, as a process started without a shell (python-livereload through its own ``shell()``
helper, which does exactly that); ``copy`` calls ``shutil.copyfile`` in the server's own
process, which no build *command* can match (a process start alone costs about 1 ms here).

Each peer runs its own serving and reload machinery, the code its CLI runs, with only the build
replaced (their real builds are an SSG: mkdocs' Markdown build, sphinx-build), in its fastest
sensible configuration:

* **mkdocs serve** (mkdocs 1.6): ``mkdocs.livereload.LiveReloadServer``, the class ``mkdocs
  serve`` runs (``serve()``: wsgiref + threads, watchdog's *polling* observer at its fixed 0.5 s
  interval, 0.1 s build delay, long-polling ``GET /livereload/<epoch>/<id>`` for the browser).
* **sphinx-autobuild** (2025.8): its Starlette app (``sphinx_autobuild.__main__._create_app``:
  StaticFiles, the script injector, ``RebuildServer`` on watchfiles' ``awatch``, WebSocket
  ``/websocket-reload`` sending ``refresh``), run by uvicorn as its ``main()`` does; uvicorn
  picks uvloop and httptools when installed (``uvicorn[standard]``), the fast configuration.
  The build callback runs in a fresh ``ProcessPoolExecutor`` per change, as sphinx-autobuild
  does.
* **python-livereload** (2.7): ``livereload.Server`` (tornado; LiveReload protocol 7 over a
  WebSocket at ``/livereload``), with pyinotify when installed (else it polls every 0.8 s),
  ``live_css`` on (its default). It refuses a second reload within 3 s of the previous one
  (``LiveReloadHandler.DEFAULT_RELOAD_TIME``); the benchmark spaces its trials accordingly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

#: The DevApp's build command in the benchmarks (run in the project root).
COMMAND = "cp src/index.html site/index.html"


def build_mode() -> str:
    mode = os.environ.get("PUNIE_BENCH_PEER_BUILD", "command")
    if mode not in ("command", "copy"):
        raise SystemExit(f"PUNIE_BENCH_PEER_BUILD must be 'command' or 'copy', not {mode!r}")
    return mode


class CopyBuild:
    """The trivial build: copy SRC/index.html to SITE/index.html, by running :data:`COMMAND`
    or in-process (:func:`build_mode`). Picklable, for the process pool sphinx-autobuild
    runs its build in; any call signature."""

    def __init__(self, src: Path, site: Path) -> None:
        self.src, self.site = src, site
        self.mode = build_mode()

    def __call__(self, *args: object, **kwargs: object) -> None:
        if self.mode == "copy":
            shutil.copyfile(self.src / "index.html", self.site / "index.html")
            return
        # As the DevApp runs it: no shell, output captured, the project root as cwd.
        subprocess.run(
            shlex.split(COMMAND),
            cwd=self.site.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )


def noop(*args: object, **kwargs: object) -> None:
    """No build: the site's own change is the reload."""


def mkdocs(port: int, site: Path, src: Path | None) -> None:
    from mkdocs.livereload import LiveReloadServer

    builder = CopyBuild(src, site) if src else noop
    server = LiveReloadServer(builder=builder, host="127.0.0.1", port=port, root=str(site))
    server.watch(str(src or site))
    server.serve()


def sphinx_autobuild(port: int, site: Path, src: Path | None) -> None:
    import uvicorn
    from sphinx_autobuild.__main__ import _create_app
    from sphinx_autobuild.filter import IgnoreFilter

    builder = CopyBuild(src, site) if src else noop
    app = _create_app([src or site], IgnoreFilter([], []), builder, site, f"127.0.0.1:{port}")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def livereload(port: int, site: Path, src: Path | None) -> None:
    from livereload import Server, shell

    server = Server()
    if src and build_mode() == "command":
        server.watch(str(src), shell(COMMAND, cwd=str(site.parent)))
    elif src:
        server.watch(str(src), CopyBuild(src, site))
    else:
        server.watch(str(site))
    server.serve(port=port, host="127.0.0.1", root=str(site))


class BengalSite:
    """Stands in for ``bengal.core.site.Site``: what the dev server reads of it, and a
    ``build()`` that runs the benchmark's build and returns Bengal's own ``BuildStats``."""

    theme = None

    def __init__(self, root: Path, output_dir: Path, build: Callable[[], None]) -> None:
        self.root_path, self.output_dir, self._build = root, output_dir, build
        self.config: dict[str, object] = {"strict_mode": True}

    def build(self, *args: object, **kwargs: object) -> object:
        import time

        from bengal.utils.build_stats import BuildStats

        t0 = time.perf_counter()
        self._build()
        return BuildStats(
            total_pages=1,
            regular_pages=1,
            build_time_ms=(time.perf_counter() - t0) * 1000,
            incremental=bool(kwargs.get("incremental")),
        )

    def reset_ephemeral_state(self) -> None:
        """Nothing to reset: the build above keeps no state."""


def bengal(port: int, site: Path, src: Path | None) -> None:
    import socketserver
    import tempfile

    from bengal.server.build_handler import BuildHandler
    from bengal.server.request_handler import BengalRequestHandler
    from bengal.utils.logger import LogLevel, configure_logging
    from watchdog.observers import Observer

    # `bengal serve` without --verbose: warnings only, to a log file (kept out of the watch).
    log_dir = Path(tempfile.mkdtemp(prefix="punie-bench-bengal-log-"))
    configure_logging(level=LogLevel.WARNING, log_file=log_dir / ".bengal-serve.log")
    BuildHandler.DEBOUNCE_DELAY = float(os.environ.get("PUNIE_BENCH_BENGAL_DEBOUNCE", "0.2"))
    root = site.parent
    if src is not None:
        fake = BengalSite(root, site, CopyBuild(src, site))
        watched = src
    else:  # the site's own change is the reload: it must not be Bengal's output directory
        fake = BengalSite(root, root / "bengal-unused-output", noop)
        watched = site

    os.chdir(site)  # DevServer._create_server
    socketserver.TCPServer.allow_reuse_address = True

    class BengalThreadingTCPServer(socketserver.ThreadingTCPServer):
        request_queue_size = 128

    httpd = BengalThreadingTCPServer(("127.0.0.1", port), BengalRequestHandler)
    httpd.daemon_threads = True
    handler = BuildHandler(fake, "127.0.0.1", port)  # DevServer._create_observer
    observer = Observer()
    observer.schedule(handler, str(watched), recursive=True)
    observer.schedule(handler, str(root), recursive=False)
    observer.start()
    try:
        httpd.serve_forever()
    finally:
        observer.stop()
        httpd.server_close()


PEERS = {
    "mkdocs": mkdocs,
    "sphinx-autobuild": sphinx_autobuild,
    "livereload": livereload,
    "bengal": bengal,
}

if __name__ == "__main__":
    name, port, site = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    source = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    PEERS[name](port, site, source)
