"""The live-reload script and its injection into HTML (sans-I/O).

The script goes before the *last* ``</body>`` (case-insensitive; ``</BODY >`` too), or at the
end when there is none: a ``</body>`` inside an earlier inline script or comment must not
receive it. The page's state (generation, build running, last build error) is embedded as
JSON, with ``<`` escaped so no string in it can close the ``<script>`` element.

What the script does, and why:

* **EventSource with capped backoff.** Automatic EventSource reconnection is replaced by our
  own (close on error, retry after 0.25 s doubling up to 10 s, with jitter) so a stopped server
  is not hammered and the ``since`` generation can be passed on every reconnect.
* **Closes on ``pagehide`` and while the tab is hidden**: browsers allow about six HTTP/1.1
  connections per host; background tabs must not hold them. On ``visible`` it reconnects with
  ``?since=<generation>``, and the server replays what it missed, merged: nothing is lost.
* **CSS hot swap**: each same-origin stylesheet ``<link>`` is cloned with a cache-busting query;
  the old one is removed only when the new one has loaded (or failed), so there is no flash.
* **Scroll kept across reloads** in ``sessionStorage``, keyed by path.
* **"rebuilding" badge** while a build runs, and a **build-error overlay** (command, exit
  status, tail of the output) on ``build_error``, cleared on ``build_ok``. Text is set with
  ``textContent``, so output is never parsed as HTML.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BODY_CLOSE = re.compile(rb"</body\s*>", re.IGNORECASE)

SCRIPT_JS = r"""(function () {
  "use strict";
  if (window.__punieReloadStarted) return;
  window.__punieReloadStarted = true;
  var S = window.__punieReload;
  var gen = S.generation, es = null, timer = null, attempt = 0, swapping = 0;
  var KEY = "punie-scroll:" + location.pathname + location.search;
  var STYLE_BADGE = "position:fixed;right:12px;bottom:12px;z-index:2147483647;" +
    "font:12px/1.4 system-ui,sans-serif;background:#1f2937;color:#fff;padding:4px 10px;" +
    "border-radius:12px;opacity:.9;pointer-events:none";
  var STYLE_OVERLAY = "position:fixed;inset:0;z-index:2147483646;overflow:auto;" +
    "background:rgba(17,17,17,.92);color:#eee;font:13px/1.45 ui-monospace,monospace;" +
    "padding:24px";
  function root() { return document.body || document.documentElement; }
  function byId(id) { return document.getElementById(id); }
  function badge(show) {
    var b = byId("__punie_badge");
    if (show && !b) {
      b = document.createElement("div");
      b.id = "__punie_badge";
      b.setAttribute("style", STYLE_BADGE);
      b.textContent = "rebuilding\u2026";
      root().appendChild(b);
    } else if (!show && b) {
      b.parentNode.removeChild(b);
    }
  }
  function overlay(err) {
    var o = byId("__punie_overlay");
    if (o) o.parentNode.removeChild(o);
    if (!err) return;
    o = document.createElement("div");
    o.id = "__punie_overlay";
    o.setAttribute("style", STYLE_OVERLAY);
    var title = document.createElement("div");
    title.setAttribute("style", "font-size:16px;color:#f87171;margin-bottom:8px");
    title.textContent = "Build failed (exit status " + err.exit_status + ")";
    var cmd = document.createElement("pre");
    cmd.setAttribute("style", "color:#93c5fd;white-space:pre-wrap");
    cmd.textContent = "$ " + (err.command || "");
    var out = document.createElement("pre");
    out.setAttribute("style", "white-space:pre-wrap");
    out.textContent = err.output || "";
    var close = document.createElement("button");
    close.textContent = "dismiss";
    close.onclick = function () { overlay(null); };
    o.appendChild(title); o.appendChild(cmd); o.appendChild(out); o.appendChild(close);
    root().appendChild(o);
  }
  function saveScroll() {
    try {
      sessionStorage.setItem(KEY, JSON.stringify([window.scrollX, window.scrollY]));
    } catch (e) {}
  }
  function restoreScroll() {
    try {
      var v = sessionStorage.getItem(KEY);
      if (!v) return;
      sessionStorage.removeItem(KEY);
      var p = JSON.parse(v);
      window.scrollTo(p[0], p[1]);
    } catch (e) {}
  }
  function reload() {
    saveScroll();
    disconnect();
    location.reload();
  }
  function swapCss() {
    var links = document.querySelectorAll('link[rel~="stylesheet"]');
    for (var i = 0; i < links.length; i++) {
      var old = links[i], url;
      if (old.getAttribute("data-punie-old")) continue;
      try { url = new URL(old.href, location.href); } catch (e) { continue; }
      if (url.origin !== location.origin) continue;
      url.searchParams.set("__punie", gen + "-" + (++swapping));
      var link = old.cloneNode(false);
      link.href = url.href;
      old.setAttribute("data-punie-old", "1");
      (function (old, link) {
        var done = false;
        function drop() {
          if (done) return;
          done = true;
          if (old.parentNode) old.parentNode.removeChild(old);
        }
        link.addEventListener("load", drop);
        link.addEventListener("error", drop);
      })(old, link);
      old.parentNode.insertBefore(link, old.nextSibling);
    }
  }
  function disconnect() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (es) { es.close(); es = null; }
  }
  function schedule() {
    if (timer !== null || document.visibilityState === "hidden") return;
    var delay = Math.min(10000, 250 * Math.pow(2, attempt++)) * (0.75 + Math.random() / 2);
    timer = setTimeout(function () { timer = null; connect(); }, delay);
  }
  function data(m) { try { return JSON.parse(m.data); } catch (e) { return {}; } }
  function connect() {
    if (es || document.visibilityState === "hidden") return;
    es = new EventSource("/__reload__?since=" + encodeURIComponent(S.run + "." + gen));
    es.onopen = function () { attempt = 0; };
    es.onerror = function () { disconnect(); schedule(); };
    es.addEventListener("reload", function (m) {
      var d = data(m);
      if (typeof d.generation === "number") gen = d.generation;
      S.generation = gen;
      if (d.action === "reload-css" && !S.pending) swapCss(); else reload();
    });
    es.addEventListener("build_start", function () { badge(true); });
    es.addEventListener("build_ok", function () {
      badge(false); overlay(null);
      if (S.pending) reload();
    });
    es.addEventListener("build_error", function (m) {
      badge(false); overlay(data(m));
      if (S.pending) reload();
    });
    es.addEventListener("shutdown", function () { disconnect(); schedule(); });
  }
  badge(S.building);
  overlay(S.error);
  if (document.readyState === "complete") restoreScroll();
  else window.addEventListener("load", restoreScroll);
  window.addEventListener("pagehide", disconnect);
  window.addEventListener("pageshow", function () { connect(); });
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") disconnect(); else connect();
  });
  connect();
})();"""


def script_tag(state: dict[str, Any]) -> bytes:
    """The ``<script>`` element for a page served in ``state``."""
    state_json = json.dumps(state, separators=(",", ":")).replace("<", "\\u003c")
    return (
        f"<script data-punie-reload>window.__punieReload={state_json};\n{SCRIPT_JS}</script>"
    ).encode()


def inject(html: bytes, state: dict[str, Any], charset: str | None = None) -> bytes:
    """Insert the script before the last ``</body>`` (any case), else append it.

    The tag is ASCII, and so is ``</body>`` in every encoding a page can declare in ASCII
    bytes, so the bytes are searched and spliced as they are. A UTF-16 page (a BOM says so)
    is the exception: there the tag and the search are in UTF-16 too.
    """
    if charset in ("utf-16le", "utf-16be"):
        assert charset is not None
        try:
            text = html.decode(charset, errors="surrogatepass")
        except UnicodeDecodeError:  # an odd number of bytes: not UTF-16 after all
            return html
        as_utf8 = inject(text.encode("utf-8", errors="surrogatepass"), state)
        return as_utf8.decode("utf-8", errors="surrogatepass").encode(charset, "surrogatepass")
    tag = script_tag(state)
    last = None
    for last in _BODY_CLOSE.finditer(html):  # noqa: B007 - keep the final match
        pass
    if last is None:
        return html + tag
    return html[: last.start()] + tag + html[last.start() :]
