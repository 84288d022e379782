"""trainpipe: reproducible, auditable, resumable SFT -> merge -> DPO pipelines."""
__version__ = "0.1.0"
