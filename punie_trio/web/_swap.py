"""Swapping one of Hypercorn's classes for ours, the way every patch here does it.

Why one helper: each patch of Hypercorn's internals (``_fast_send``, ``_deflate``,
``_ws_refusals``) replaces a class a Hypercorn module looks up by name when it builds a
connection. Each must be idempotent (a process may start several servers), and must patch
nothing, with a warning, if that name no longer holds the class we expect (Hypercorn
changed, and our subclass may no longer fit).
"""

from __future__ import annotations

import logging
from types import ModuleType

log = logging.getLogger(__name__)


def swap_class(module: ModuleType, name: str, stock: type, ours: type, without: str) -> bool:
    """Make ``module.name`` ``ours`` if it is ``stock`` (or ``ours`` already); otherwise
    log "Hypercorn internals changed; ``without``" and return False, patching nothing."""
    current = getattr(module, name, None)
    if current is ours:
        return True
    if current is not stock:
        log.warning("Hypercorn internals changed; %s", without)
        return False
    setattr(module, name, ours)
    return True
