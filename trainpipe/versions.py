"""Installed package versions, read from package metadata without importing the packages (so that
recording them never loads torch). Fingerprints, lineage and the tokenized-data cache share it."""

from __future__ import annotations

import importlib.metadata


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
