"""What every config model shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default), and so are values
    assigned after loading that fail validation (`--set` goes through the same checks)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
