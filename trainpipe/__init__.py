"""trainpipe: reproducible, auditable, resumable SFT -> merge -> DPO pipelines.

`import trainpipe` stays light (no torch, no engine): `trainpipe.run` and `trainpipe.resume` load the
API on first use, so the CLI's read commands, which import trainpipe.cli, never pay for it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["resume", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trainpipe import api
        return getattr(api, name)
    raise AttributeError(f"module 'trainpipe' has no attribute {name!r}")
