"""A stage attempt's own process: it runs one stage, then that stage's gate, and reports back.

It sits above `stages/` and `validators/` (it calls both) and below `engine/`, which starts and
supervises it: `worker.py` is the entry point, `zygote.py` the pre-imported worker it is forked from."""
