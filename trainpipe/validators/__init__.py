"""Gates by stage. Values are module paths; each module exposes `checks(ctx) -> list[Check]`."""

from trainpipe.validators.gate import Check, GateContext, GateOutcome, Outcome, run_gate

GATES = {
    "sft": ("gate1_sft", "trainpipe.validators.sft_gate"),
}

__all__ = ["GATES", "Check", "GateContext", "GateOutcome", "Outcome", "evaluate", "run_gate"]


def evaluate(ctx: GateContext) -> GateOutcome | None:
    """Run the gate for ctx.stage; None when the stage has no gate yet."""
    import importlib

    if ctx.stage not in GATES:
        return None
    gate_name, module = GATES[ctx.stage]
    return run_gate(gate_name, importlib.import_module(module).checks(ctx), ctx)
