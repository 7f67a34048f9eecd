"""Shared test set-up: offline, no W&B, small thread count, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    """Keep the file-digest cache inside each test's tmp_path."""
    monkeypatch.setenv("LIGHTNING_MIA_CACHE", str(tmp_path / "cache"))
