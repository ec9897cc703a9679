"""Issue 11 item 1: the generated Ray auth token file is readable by its owner only."""
from __future__ import annotations

import os
import stat

import pytest

from cluster.ray_runtime import auth_token, ensure_auth_token


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = tmp_path / "home" / ".ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    return path


def test_generated_token_is_0600_in_a_0700_folder(token_file):
    old = os.umask(0o022)  # a umask that would make a plainly written file world-readable
    try:
        tok = ensure_auth_token()
    finally:
        os.umask(old)
    assert len(tok) == 64 and int(tok, 16) >= 0
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert ensure_auth_token() == tok == auth_token()  # kept, not regenerated


def test_existing_world_readable_token_is_tightened(token_file):
    token_file.parent.mkdir(parents=True)
    token_file.write_text("ab" * 32 + "\n")
    token_file.chmod(0o644)
    assert ensure_auth_token() == "ab" * 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_empty_token_file_is_refused_with_a_reason(token_file):
    token_file.parent.mkdir(parents=True)
    token_file.write_text("")
    token_file.chmod(0o600)
    with pytest.raises(RuntimeError, match="empty"):
        ensure_auth_token()
