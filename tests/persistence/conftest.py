"""Fixtures for the persistence, reconnect, security and limits tests.

The in-process server fixture is the integration suite's own (re-exported, not copied)."""

from __future__ import annotations

from ..integration.conftest import start_server

__all__ = ["start_server"]
