"""`trainpipe verify RUN_ID`: re-hash every artifact the ledger recorded for a run and say what
changed or vanished since. Reads only; a mismatch is reported, never repaired."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainpipe.checkpoints import sha256_files
from trainpipe.paths import check_run_id

if TYPE_CHECKING:
    from trainpipe.store.reader import LedgerReader


def verify_run(ledger: LedgerReader, run_id: str) -> dict[str, Any]:
    run = ledger.get_run(check_run_id(run_id))
    files = []
    rows = ledger.artifacts(run["run_id"])
    present = [Path(row["path"]) for row in rows if Path(row["path"]).is_file()]
    digests = dict(zip(present, sha256_files(present)))
    for row in rows:
        path = Path(row["path"])
        entry = {"stage": row["stage"], "path": row["path"], "size_bytes": row["size_bytes"],
                 "sha256": row["sha256"], "status": "ok", "detail": None}
        if path not in digests:
            entry.update(status="missing", detail="no such file")
        else:
            size = path.stat().st_size
            digest = digests[path]
            if digest != row["sha256"]:
                entry.update(status="changed", detail=f"sha256 {digest[:12]}... (recorded {row['sha256'][:12]}...), "
                                                      f"{size} bytes (recorded {row['size_bytes']})")
        files.append(entry)
    problems = [f for f in files if f["status"] != "ok"]
    return {"run_id": run["run_id"], "state": run["state"], "ok": not problems, "checked": len(files),
            "changed": sum(f["status"] == "changed" for f in files),
            "missing": sum(f["status"] == "missing" for f in files), "artifacts": files}
