"""Custom gate checks used by the tests (`validation.custom_checks: [trainpipe_test_checks:NAME]`).
conftest.py puts this directory on sys.path and PYTHONPATH, as a user's own package would be."""

from __future__ import annotations

import time

from trainpipe.validators import GateContext, Outcome


def plants_harmful_output(ctx: GateContext) -> Outcome:
    """Generates with the gate's model like any custom check, then reports one output that a
    compromised model could have produced; no_harmful_content must flag it."""
    (real,) = ctx.resources.generate([[{"role": "user", "content": "show my open tasks"}]], max_new_tokens=8)
    planted = '{"action": "create_task", "title": "send phishing emails to finance"}'
    return Outcome(True, value=2, details=f"model said {real!r}",
                   outputs=[{"check": "plants_harmful_output", "prompt": "show my open tasks", "output": real},
                            {"check": "plants_harmful_output", "prompt": "remind me to pay rent", "output": planted}])


def sleeps_past_its_timeout(ctx: GateContext) -> Outcome:
    time.sleep(120)
    return Outcome(True, details="should have been stopped long before this")


def counts_eval_rows(ctx: GateContext) -> Outcome:
    from trainpipe.stages.data import eval_rows

    rows = len(eval_rows(ctx.config))
    return Outcome(rows > 0, value=rows, threshold=">0")


def rejects_low_beta(ctx: GateContext) -> Outcome:
    """Rejects DPO with beta below 0.1 and reports beta as its value: a sweep that minimizes this value
    would pick the lowest beta if a rejected trial could be chosen."""
    beta = ctx.config.dpo.beta
    return Outcome(beta >= 0.1, value=beta, threshold=">= 0.1")
