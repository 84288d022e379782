"""Secrets come from the environment only: they are never written to the ledger, a config snapshot,
a spec file or a log (tests/test_security.py)."""

from __future__ import annotations

import os


def hub_token() -> str | None:
    """The Hugging Face Hub token, for gated or private models and datasets, and for uploads."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
