"""Stages, by name. Values are module paths so that naming a stage imports nothing heavy; each
module exposes `run(ctx: StageContext) -> StageResult` and runs inside a child process."""

STAGES = {
    "sft": "trainpipe.stages.sft",
    "merge": "trainpipe.stages.merge",
    "dpo": "trainpipe.stages.dpo",
}

# Directory names inside a run directory; the lesson's layout (sft/, merged/, dpo/).
OUTPUT_DIRS = {"sft": "sft", "merge": "merged", "dpo": "dpo"}
