"""trainpipe: reproducible, auditable, resumable SFT -> merge -> DPO pipelines.

`import trainpipe` stays light (no torch); the API imports what it needs when called.
"""

from trainpipe.api import resume, run

__version__ = "0.1.0"
__all__ = ["resume", "run"]
