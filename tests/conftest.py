from __future__ import annotations

from collections.abc import Iterator

import pytest

from .acp_schema import SchemaChecker


@pytest.fixture
def acp_schema() -> Iterator[SchemaChecker]:
    """Validate every agent message a test sees; fails the test if none was checked."""
    checker = SchemaChecker()
    yield checker
    assert checker.checked > 0, "the test validated no agent message against the ACP schema"
