"""Pipeline configuration: the lesson's YAML format (models.py, datasets.py), loaded and validated (loading.py)."""

from trainpipe.config.datasets import FORMAT_NAMES, HUB_PREFIX, DatasetPaths, DatasetSource
from trainpipe.config.loading import config_from_snapshot, ineffective_overrides, load_config
from trainpipe.config.models import (
    BUILTIN_CHECKS,
    DEFAULT_BLOCKLIST,
    DEFAULT_TARGET_MODULES,
    STAGE_ORDER,
    STAGE_SETTINGS,
    UPLOAD_STAGE,
    CheckOverride,
    DPOSettings,
    LauncherSettings,
    MergeSettings,
    PipelineConfig,
    SFTSettings,
    StageEntry,
    StageSettings,
    ValidationConfig,
)

__all__ = [
    "BUILTIN_CHECKS", "DEFAULT_BLOCKLIST", "DEFAULT_TARGET_MODULES", "FORMAT_NAMES", "HUB_PREFIX", "STAGE_ORDER",
    "STAGE_SETTINGS", "UPLOAD_STAGE", "CheckOverride", "DPOSettings", "DatasetPaths", "DatasetSource",
    "LauncherSettings", "MergeSettings", "PipelineConfig", "SFTSettings", "StageEntry", "StageSettings",
    "ValidationConfig", "config_from_snapshot", "ineffective_overrides", "load_config",
]
