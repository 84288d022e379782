"""The `upload` stage's work: push the run's final model directory to the Hub.

It runs in the orchestrator, not in a stage child: it needs no torch, only huggingface_hub, and reads
the model files without changing them. The token comes from the environment (HF_TOKEN) and goes to
`HfApi` only; every message that leaves here has it scrubbed, since the ledger, the logs and the
exports all receive these messages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainpipe import failures
from trainpipe.credentials import hub_token

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{4,}")
# Exception classes (httpx's, requests', the stdlib's) that mean the Hub was never reached.
_NETWORK = ("ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "TransportError",
            "ConnectionError", "Timeout", "ProxyError", "OSError")


class UploadFailed(Exception):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.message = message
        self.kind = kind


def scrub(text: str, token: str | None = None) -> str:
    """`text` with the token, and anything shaped like a Hub token, masked."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def endpoint_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


def push(folder: str | None, repo_id: str, run_id: str) -> dict[str, Any]:
    """Create the repo if needed and upload `folder` as one commit; the commit's URL and oid.
    UploadFailed, token-free, with a kind from trainpipe/failures.py, on any failure."""
    token = hub_token()
    if not token:
        raise UploadFailed("HF_TOKEN is not set (the token is read from the environment only)", failures.USER)
    if not folder or not Path(folder).is_dir():
        raise UploadFailed(f"the final model directory {folder or '(none recorded)'} does not exist",
                           failures.USER)
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                   commit_message=f"trainpipe run {run_id}")
    except Exception as exc:  # noqa: BLE001 - every failure becomes one token-free message
        raise UploadFailed(*_describe(exc, token)) from None
    return {"repo_id": repo_id, "commit_url": getattr(commit, "commit_url", None) or str(commit),
            "commit_oid": getattr(commit, "oid", None)}


def _describe(exc: BaseException, token: str) -> tuple[str, str]:
    detail = scrub(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", token)
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OfflineModeIsEnabled" in names:
        return f"HF_HUB_OFFLINE is set, so the Hub is not contacted ({detail})", failures.USER
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"{endpoint_host()} refused the token (HTTP {status}); check that HF_TOKEN has write access "
                f"to the repo ({detail})", failures.USER)
    if names & set(_NETWORK):
        return f"cannot reach {endpoint_host()} ({detail})", failures.TRANSIENT
    return f"{detail}", failures.TRANSIENT
