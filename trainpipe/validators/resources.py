"""The one model a gate loads, shared by every check in it that generates.

Which model a gate judges: after SFT the base with the new adapter, after the merge the merged
model, after DPO the standalone merged copy if one was saved, else the policy with the DPO adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainpipe.validators.gate import GateContext


class GateResources:
    def __init__(self, ctx: GateContext):
        self._ctx = ctx
        self._loaded: tuple[Any, Any] | None = None
        self._error: str | None = None

    def preload(self) -> None:
        """Load now, in the gate's process, so forked checks share it; a failure is kept, not raised."""
        try:
            self.model()
        except Exception:  # noqa: BLE001 - each check that needs the model reports the failure
            pass

    def model(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded once; raises the same error to every caller if loading failed."""
        if self._error:
            raise RuntimeError(self._error)
        if self._loaded is None:
            try:
                self._loaded = self._load()
            except Exception as exc:
                self._error = f"could not load the model to validate: {type(exc).__name__}: {exc}"
                raise RuntimeError(self._error) from exc
        return self._loaded

    def _load(self) -> tuple[Any, Any]:
        from trainpipe.stages.loading import load_causal_lm, load_tokenizer, resolve_model

        ctx, config = self._ctx, self._ctx.config
        output = Path(ctx.output_path or "")
        if ctx.stage == "dpo" and (output / "merged" / "config.json").is_file():
            output = output / "merged"
        if (output / "adapter_config.json").is_file():
            from peft import PeftModel

            # With the merge disabled, the DPO adapter is the SFT adapter trained on, so it goes on the base.
            base = ctx.inputs.get("policy_model") or ctx.inputs.get("base_model")
            model = load_causal_lm(resolve_model(base), config)
            model = PeftModel.from_pretrained(model, str(output))
        else:
            model = load_causal_lm(str(output), config)
        tokenizer = load_tokenizer(str(output), config)
        return model.eval(), tokenizer

    def system_prompt(self) -> str | None:
        """The deployment's system prompt, taken from the held-out rows, for prompts that lack one."""
        from trainpipe.stages.data import eval_rows

        for row in eval_rows(self._ctx.config)[:1]:
            for message in row.get("messages", []):
                if message.get("role") == "system":
                    return message.get("content")
        return None

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int | None = None,
                 batch_size: int = 16) -> list[str]:
        """Greedy completions of chat conversations, decoded without special tokens."""
        import torch

        model, tokenizer = self.model()
        max_new_tokens = max_new_tokens or self._ctx.config.validation.max_new_tokens
        tokenizer.padding_side = "left"
        outputs: list[str] = []
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = {k: v.to(model.device) for k, v in encoded.items()}
            with torch.no_grad():
                generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
            prompt_length = encoded["input_ids"].shape[1]
            outputs.extend(tokenizer.decode(row[prompt_length:], skip_special_tokens=True).strip()
                           for row in generated)
        return outputs
