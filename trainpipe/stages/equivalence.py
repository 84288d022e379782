"""The fixed prompts and logits gate 2 compares: base + adapter (computed by the merge stage right
before it merges, so the gate needs no second model) against the merged model read back from disk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainpipe.config import PipelineConfig

SAMPLE_CONVERSATION = [{"role": "user", "content": "hello"}]


def equivalence_prompts(config: PipelineConfig) -> list[list[dict[str, str]]]:
    from trainpipe.stages.data import eval_rows, first_rows, split_prompt_completion

    rows = eval_rows(config) or (first_rows(config.datasets.sft, "sft", config.validation.merge_prompts)
                                 if config.datasets.sft else [])
    prompts = []
    for row in rows[:config.validation.merge_prompts]:
        if "messages" in row:
            prompts.append(split_prompt_completion(row["messages"])["prompt"])
        elif isinstance(row.get("prompt"), str):
            prompts.append([{"role": "user", "content": row["prompt"]}])
    return prompts or [SAMPLE_CONVERSATION]


def logits_for(model: Any, tokenizer: Any, conversation: list[dict[str, str]]) -> Any:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return model(**{k: v.to(model.device) for k, v in ids.items()}).logits.float()


def reference_logits(model: Any, tokenizer: Any, config: PipelineConfig) -> list[Any]:
    """Logits of base + adapter, unmerged and in float32, on the equivalence prompts (on CPU).

    The merge stage computes them from the model it has just loaded, right before merging it, and
    hands them to its gate in memory (`GateContext.from_stage`): the very reference the check would
    otherwise load a second model for. The merged model is still the one read back from disk."""
    import torch

    with torch.no_grad():
        return [logits_for(model, tokenizer, conversation).cpu() for conversation in equivalence_prompts(config)]
