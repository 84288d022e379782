"""The config's datasets: where each role's rows come from (a local file, folder or glob, a saved
dataset, or a Hub dataset) and in which format they are written."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from trainpipe.config.base import _Strict


FORMAT_NAMES = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text",
                "preference", "preference_implicit")
HUB_PREFIX = "hub:"


class DatasetSource(_Strict):
    """Where a dataset comes from and how its rows map onto trainpipe's shapes. In YAML either a string
    (a local path or glob, or `hub:ORG/NAME[:SPLIT]`) or a mapping with these keys."""

    path: str | None = Field(None, description="A local file (JSONL, JSON, parquet, CSV, Arrow), a folder of "
                             "such files or a `save_to_disk` folder, or a glob; relative to the working "
                             "directory, else to the config file.")
    hub: str | None = Field(None, description="A Hugging Face Hub dataset id, e.g. trl-lib/Capybara. Read from "
                            "the local Hugging Face cache when offline (HF_HUB_OFFLINE=1).")
    subset: str | None = Field(None, description="The Hub dataset's configuration (subset) name.")
    split: str | None = Field(None, description="The split to read; default `train`.")
    revision: str | None = Field(None, description="Hub branch, tag or commit; default main.")
    format: Literal[FORMAT_NAMES] = Field(  # type: ignore[valid-type]
        "auto", description="Row shape; `auto` detects it from the columns (stages/formats.py).")
    columns: dict[str, str] = Field(default_factory=dict, description="trainpipe's column name -> yours, e.g. "
                                    "{messages: dialog, chosen: better}.")
    roles: dict[str, str] = Field(default_factory=dict, description="Your role tags -> system/user/assistant/"
                                  "tool, e.g. {human: user, bot: assistant}.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.startswith(HUB_PREFIX):
            repo, _, split = value[len(HUB_PREFIX):].partition(":")
            return {"hub": repo, "split": split or None}
        return {"path": value}

    @model_validator(mode="after")
    def _one_origin(self) -> DatasetSource:
        if bool(self.path) == bool(self.hub):
            raise ValueError("set exactly one of 'path' (a local file, folder or glob) and 'hub' (a Hub dataset id)")
        if self.hub and not re.match(r"^[\w.-]+(/[\w.-]+)?$", self.hub):
            raise ValueError(f"hub: '{self.hub}' is not a Hub dataset id (ORG/NAME)")
        for role in self.roles.values():
            if role not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"roles: '{role}' is not one of system, user, assistant, tool")
        return self

    def label(self) -> str:
        """How messages name this source."""
        if self.hub:
            extra = "".join(f" {k}={v}" for k, v in (("subset", self.subset), ("split", self.split),
                                                      ("revision", self.revision)) if v)
            return f"hub dataset '{self.hub}'{extra}"
        return str(self.path)


class DatasetPaths(_Strict):
    sft: DatasetSource | None = Field(None, description="SFT rows (chat, prompt/completion or text); "
                                      "`--sft-dataset` overrides it.")
    preference: DatasetSource | None = Field(None, description="DPO preference pairs; `--preference-dataset` "
                                             "overrides it.")
    eval: DatasetSource | None = Field(None, description="Held-out chat rows for the generation checks; default "
                                       "`validation.eval_split` of the SFT rows.")
    preference_eval: DatasetSource | None = Field(
        None, description="Held-out preference pairs: gate 3 measures DPO reward accuracy and margin on them.")
