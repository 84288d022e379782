"""Checks that generate with the gate's shared model: output format on held-out prompts, and
safety on the red-team set. Both are greedy, so a given model always gets the same verdict."""

from __future__ import annotations

import json
import re
from typing import Any

from trainpipe.paths import bundled_path
from trainpipe.stages.data import load_rows, split_prompt_completion
from trainpipe.validators.gate import GateContext, Outcome

SHOWN = 3  # failing examples quoted in a check's details


def _split(row: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """A held-out row as (prompt conversation, reference answer or None)."""
    if "messages" in row:
        split = split_prompt_completion(row["messages"])
        return split["prompt"], split["completion"][0]["content"]
    prompt = row.get("prompt")
    conversation = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    completion = row.get("completion")
    if isinstance(completion, list):
        completion = completion[-1].get("content")
    return conversation, completion


def _expected_keys(reference: str | None, fallback: list[str]) -> list[str]:
    try:
        parsed = json.loads(reference) if reference else None
    except json.JSONDecodeError:
        parsed = None
    return sorted(parsed) if isinstance(parsed, dict) else sorted(fallback)


def format_problem(output: str, expected: list[str]) -> str | None:
    """Why `output` is not a JSON object with the expected keys, or None if it is."""
    try:
        parsed = json.loads(output)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg})"
    if not isinstance(parsed, dict):
        return f"JSON {type(parsed).__name__}, not an object"
    missing = [key for key in expected if key not in parsed]
    return f"missing keys {missing}" if missing else None


def output_format_valid(ctx: GateContext) -> Outcome:
    from trainpipe.stages.data import eval_rows

    validation = ctx.config.validation
    rows = eval_rows(ctx.config)
    if not rows:
        return Outcome(False, details="no held-out prompts: set datasets.eval or validation.eval_split > 0")
    conversations, references = zip(*(_split(row) for row in rows))
    outputs = ctx.resources.generate(list(conversations))
    failures = []
    problems = []
    for index, (output, reference) in enumerate(zip(outputs, references)):
        problem = format_problem(output, _expected_keys(reference, validation.format_required_keys))
        problems.append(problem)
        if problem:
            failures.append(f"#{index} {problem}: {output[:80]!r}")
    share = 1 - len(failures) / len(rows)
    passed = share >= validation.format_threshold
    details = f"{len(rows) - len(failures)}/{len(rows)} held-out outputs are JSON objects with the expected keys"
    if failures:
        details += "; e.g. " + " | ".join(failures[:SHOWN])
    generations = [{"check": "output_format_valid", "prompt": c[-1]["content"], "output": o, "problem": p}
                   for c, o, p in zip(conversations, outputs, problems)]
    return Outcome(passed, value=round(share, 4), threshold=f">= {validation.format_threshold}",
                   details=details, outputs=generations)


def redteam_prompts(ctx: GateContext) -> list[str]:
    path = ctx.config.validation.redteam_file or bundled_path("examples/task_api/redteam.jsonl")
    return [row["prompt"] for row in load_rows(path)]


def no_harmful_content(ctx: GateContext) -> Outcome:
    """Generate on the red-team set, then scan those outputs and every output generated earlier in
    this gate (held-out prompts, custom checks) against the blocklist."""
    patterns = [re.compile(p, re.IGNORECASE) for p in ctx.config.validation.blocklist]
    prompts = redteam_prompts(ctx)
    system = ctx.resources.system_prompt()
    prefix = [{"role": "system", "content": system}] if system else []
    outputs = ctx.resources.generate([prefix + [{"role": "user", "content": p}] for p in prompts])
    scanned = [{"check": "no_harmful_content", "prompt": p, "output": o} for p, o in zip(prompts, outputs)]
    scanned += ctx.generations
    flagged = []
    for index, item in enumerate(scanned):
        hit = next((p.pattern for p in patterns if p.search(item["output"])), None)
        if hit and index < len(prompts):
            item["problem"] = f"matches {hit!r}"
        if hit:
            flagged.append(f"{item['prompt'][:60]!r} -> {item['output'][:60]!r} (matches {hit!r}, from "
                           f"{item.get('check', 'a custom check')})")
    details = f"{len(scanned)} outputs scanned ({len(prompts)} red-team prompts), {len(patterns)} patterns"
    if flagged:
        details = f"{len(flagged)} flagged: " + " | ".join(flagged[:SHOWN]) + f"; {details}"
    return Outcome(not flagged, value=len(flagged), threshold=0, details=details, outputs=scanned[:len(prompts)])
