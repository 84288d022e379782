"""What the Hub says about a base model, asked once per process: the preflight's `model_info` (with
every file's size) answers both whether the model exists (engine/preflight.py) and how much its
download and its outputs take (stages/footprint.py). A sweep's trials, each an ordinary run with its
own preflight, reuse the first answer. A failed request is not kept: the next one asks again.
"""

from __future__ import annotations

from typing import Any

HUB_TIMEOUT_S = 10.0

# (repo id, revision) -> huggingface_hub.hf_api.ModelInfo
_INFO: dict[tuple[str, str | None], Any] = {}


def model_info(repo_id: str, revision: str | None = None) -> Any:
    """huggingface_hub's ModelInfo, with `siblings[].size` filled in (`files_metadata=True`). Raises what
    HfApi raises (the caller says what it means)."""
    key = (repo_id, revision)
    if key not in _INFO:
        from huggingface_hub import HfApi

        from trainpipe.credentials import hub_token

        _INFO[key] = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S, files_metadata=True,
                                        token=hub_token())
    return _INFO[key]


def forget() -> None:
    """Drop every kept answer (tests; a long-lived process that wants fresh sizes)."""
    _INFO.clear()
