from __future__ import annotations

import stat
from pathlib import Path

import pytest

from punie_trio import _paths


def test_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path / "d"))
    assert _paths.default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("PUNIE_DATA_DIR")
    assert _paths.default_data_dir().name == "punie-trio"
    assert _paths.default_config_path().name == "config.toml"
    assert _paths.token_path(tmp_path) == tmp_path / "token"


def test_ensure_data_dir_is_private(tmp_path: Path) -> None:
    path = _paths.ensure_data_dir(tmp_path / "a" / "b")
    assert path.is_dir()
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert _paths.ensure_data_dir(path) == path  # idempotent
