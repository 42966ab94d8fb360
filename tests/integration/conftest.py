"""Fixtures: a real punie-trio server (Hypercorn on port 0) in the test's Trio run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from punie_trio.server import Running
from punie_trio.worker import EchoModel, Model

from ._support import in_process_server

StartServer = Callable[..., AbstractAsyncContextManager[Running]]


@pytest.fixture
def start_server(tmp_path: Path) -> StartServer:
    """``async with start_server(model, **ServeConfig fields) as running:`` a server on port 0,
    serving ``tmp_path`` as its project root; leaving the block shuts it down."""

    def start(model: Model | None = None, **config: Any) -> AbstractAsyncContextManager[Running]:
        return in_process_server(tmp_path, model or EchoModel(), **config)

    return start


@pytest.fixture
async def server(start_server: StartServer) -> AsyncIterator[Running]:
    """A running server with the echo model."""
    async with start_server() as running:
        yield running
