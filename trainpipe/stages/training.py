"""Helpers SFT and DPO share: trainer arguments, callbacks, the trl 1.15 CPU shim, and output finalising."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainpipe import faults
from trainpipe.checkpoints import write_manifest
from trainpipe.stages import distributed
from trainpipe.stages.base import StageContext

# Set by SIGTERM/SIGINT/SIGUSR2 in the stage process: save at the next step boundary and stop
# (preemption). `at_once`: no training step is running (loading, merging, the gate), so there is no
# step boundary to wait for and nothing a checkpoint would keep: the stop is raised where the process is.
_STOP_REQUESTED = {"flag": False, "at_once": False}


def install_preemption_handler() -> None:
    def request_stop(signum: int, _frame: Any) -> None:
        _STOP_REQUESTED["flag"] = True
        if _STOP_REQUESTED["at_once"]:
            _STOP_REQUESTED["at_once"] = False
            raise Preempted(f"stopped by {signal.Signals(signum).name} outside a training step")

    # SIGUSR2 too: a scheduler's warning sent to every process of the job (no `B:`) must stop the
    # stage, not kill it (USR2's default action).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, request_stop)


def stop_requested() -> bool:
    return _STOP_REQUESTED["flag"]


@contextmanager
def stop_at_once(enabled: bool = True) -> Iterator[None]:
    """Inside: a stop request raises Preempted at once (True) or waits for the step boundary (False)."""
    previous = _STOP_REQUESTED["at_once"]
    _STOP_REQUESTED["at_once"] = enabled
    try:
        if enabled and _STOP_REQUESTED["flag"]:
            raise Preempted("stopped on request before this phase began")
        yield
    finally:
        _STOP_REQUESTED["at_once"] = previous


def trainer_kwargs(ctx: StageContext, settings: Any) -> dict[str, Any]:
    """Arguments shared by SFTConfig and DPOConfig."""
    import torch

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.work_dir / "checkpoints"),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.learning_rate,
        # transformers 5 takes a warmup ratio as a float in [0, 1) through warmup_steps.
        warmup_steps=min(settings.warmup_ratio, 0.999) if settings.warmup_ratio else 0,
        lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        # Gates must see NaN/inf losses; transformers hides them from the logs by default.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=ctx.config.checkpoint_interval(ctx.spec.stage),
        seed=ctx.config.seed,
        data_seed=ctx.config.seed,
        report_to=_report_to(ctx, settings),
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=cuda and not torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        max_length=settings.max_seq_length,
        # On a GPU it trades compute for memory; on CPU it only costs time.
        gradient_checkpointing=cuda,
    )
    if distributed.world_size() > 1:
        # Left unset on CPU, accelerate 1.15 picks MPI whenever torch was built with it, and MPI needs
        # mpirun, not torchrun; gloo works with torchrun's env:// rendezvous on any CPU build.
        kwargs["ddp_backend"] = "nccl" if cuda else "gloo"
        # Every LoRA parameter takes part in each forward pass; the unused-parameter search only
        # costs a traversal per step (and conflicts with gradient checkpointing on a GPU).
        kwargs["ddp_find_unused_parameters"] = False
    return kwargs


def _report_to(ctx: StageContext, settings: Any) -> list[str] | str:
    trackers = [t for t in settings.report_to if t != "none"]
    if "tensorboard" in trackers:
        # transformers 5 reads the directory from the environment; one folder per stage, beside the
        # stage outputs, so `tensorboard --logdir <run dir>/tensorboard` shows the whole run.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(ctx.spec.output_dir).parent / "tensorboard" / ctx.spec.stage)
    return trackers or "none"


def callbacks(ctx: StageContext, *, evaluate_at_end: bool = False) -> list[Any]:
    """The stage's trainer callbacks. `evaluate_at_end`: run the trainer's evaluation once, after the
    last step and before its checkpoint, on every rank (a held-out pass after `train()` returned
    would leave DDP's other ranks out of its collectives); the checkpoint's log history keeps it, so
    a resume from the final checkpoint still has it."""
    from transformers import TrainerCallback

    events = ctx.events
    fault = ctx.spec.fault or {}

    class PipelineCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if kw.get("model") is not None:
                events.emit("model", **loaded_model_facts(kw["model"]))
            events.emit("progress", step=state.global_step, total=state.max_steps)

        def on_step_end(self, args, state, control, **kw):
            events.emit("progress", step=state.global_step, total=state.max_steps)
            if evaluate_at_end and state.global_step == state.max_steps:
                control.should_evaluate = True
            faults.at_step(fault, state.global_step, distributed.rank())
            if distributed.any_rank(stop_requested()):
                _STOP_REQUESTED["flag"] = True
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                events.emit("log", step=state.global_step, total=state.max_steps, logs=logs)

        def on_save(self, args, state, control, **kw):
            # Each rank writes its own rng_state_<rank>.pth and nothing waits for the others before
            # on_save (transformers 5.23, Trainer._save_checkpoint): the manifest must list them all.
            distributed.barrier()
            if not distributed.is_main():
                return
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                digest = write_manifest(checkpoint, state.global_step, world_size=distributed.world_size())
                events.emit("checkpoint", step=state.global_step, path=str(checkpoint), manifest_sha256=digest)

    return [PipelineCallback()]


def loaded_model_facts(model: Any) -> dict[str, Any]:
    """What the trainer holds, read off the model itself rather than the settings that asked for it:
    how many of its linear layers are bitsandbytes 4-bit, and the quantization config it carries."""
    four_bit = sum(1 for module in model.modules()
                   if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"))
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return {"linear4bit_layers": four_bit, "quantization_config": quantization}


def patch_trl_for_cpu() -> None:
    """trl 1.15 computes every loss through a Triton kernel and has no CPU fallback (trl 1.16 does).

    Without Triton, its `_ChunkedLogProbFunction` is None and training fails; give it the same
    contract in plain torch. Only fires on that combination; trl 1.16+ is left alone.
    """
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return
    if not hasattr(trl_utils, "_ChunkedLogProbFunction") or trl_utils._ChunkedLogProbFunction is not None:
        return
    import torch

    class TorchLogProb:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                  outputs=("log_probs",)):
            logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            logits = logits / temperature
            log_softmax = logits.log_softmax(-1)
            log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            entropy = -(log_softmax.exp() * log_softmax).sum(-1) if "entropy" in outputs else None
            log_sum_sq = torch.logsumexp(2 * log_softmax, -1).detach() if "log_sum_sq_probs" in outputs else None
            mean_logits = logits.mean(-1).detach() if "mean_logits" in outputs else None
            is_top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
            return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    trl_utils._ChunkedLogProbFunction = TorchLogProb


def train(trainer: Any, ctx: StageContext) -> Any:
    """Run the trainer, resuming from the verified checkpoint the orchestrator chose, if any."""
    checkpoint = ctx.spec.resume_from or None
    if checkpoint and _trained_to_the_end(checkpoint):
        result = _load_final_checkpoint(trainer, checkpoint, ctx)
    else:
        with stop_at_once(False):  # the callback saves at the next step boundary and stops there
            result = trainer.train(resume_from_checkpoint=checkpoint)
    distributed.finish()
    if stop_requested():
        raise Preempted(f"{ctx.spec.stage} stopped at step {trainer.state.global_step} on request")
    if not distributed.is_main():
        raise OtherRankDone()
    return result


def _trained_to_the_end(checkpoint: str) -> bool:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return bool(state.get("max_steps")) and state["global_step"] >= state["max_steps"]


def _load_final_checkpoint(trainer: Any, checkpoint: str, ctx: StageContext) -> Any:
    """A checkpoint taken at the last step (the stage died after training: writing its output, in its
    gate) leaves nothing to train. transformers would still run one more step when resuming from it
    (5.23: the epoch loop takes its next batch before it checks max_steps), which moves the weights
    under any schedule whose learning rate is not zero there. So load its weights and state instead."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    ctx.events.emit("progress", step=trainer.state.global_step, total=trainer.state.max_steps)
    losses = log_losses(trainer.state.log_history)
    return TrainOutput(trainer.state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


class OtherRankDone(Exception):
    """A rank other than 0 finished training: rank 0 writes the output and runs the gate alone."""


class Preempted(BaseException):  # not Exception: no library's `except Exception` may swallow it
    """The stage stopped because SIGTERM/SIGINT/SIGUSR2 asked it to: at a step boundary, after saving
    a checkpoint, or at once where no training step was running."""


def log_losses(history: list[dict[str, Any]], key: str = "loss") -> list[float]:
    return [float(entry[key]) for entry in history if key in entry]


def finalize_output(ctx: StageContext, staging: Path) -> Path:
    """Rename the finished output into place, so a half-written one is never taken for finished."""
    final = ctx.output_dir
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    faults.at_point(ctx.spec.fault, "rename")
    os.replace(staging, final)
    return final


def staging_dir(ctx: StageContext) -> Path:
    path = ctx.work_dir / f"output.tmp-{ctx.spec.attempt}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_stage_record(staging: Path, data: dict[str, Any]) -> None:
    (staging / "trainpipe_stage.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
