"""The shipped built-in model: its files verify, it was built by the current recipe, a rebuild
reproduces what is CPU-independent, and a damaged copy is refused with a clear message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from trainpipe.errors import TrainpipeError
from trainpipe.stages import tiny_model
from trainpipe.stages.tiny_model import ASSET_DIR, CHECKSUMS, read_checksums, verify_model_dir


def test_shipped_model_matches_its_checksums_and_the_current_recipe():
    proc = subprocess.run([sys.executable, "-m", "trainpipe.stages.tiny_model", "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(current)" in proc.stdout
    recipe, sums = read_checksums(ASSET_DIR)
    assert recipe == tiny_model._fingerprint(tiny_model._corpus())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(sums)
    # Small enough to ship as package data.
    assert sum((ASSET_DIR / name).stat().st_size for name in sums) < 1024 * 1024


def test_tampered_or_missing_file_is_refused_by_name(tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(ASSET_DIR, copy)
    verify_model_dir(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TrainpipeError, match=r"model\.safetensors does not match its sha256 in SHA256SUMS"):
        verify_model_dir(copy)
    weights.unlink()
    with pytest.raises(TrainpipeError, match=r"model\.safetensors is missing"):
        verify_model_dir(copy)
    (copy / CHECKSUMS).unlink()
    with pytest.raises(TrainpipeError, match="SHA256SUMS is missing"):
        verify_model_dir(copy)


def test_rebuild_reproduces_tokenizer_and_architecture(tmp_path):
    """The tokenizer and config do not depend on the CPU, so a rebuild matches them byte for byte. The
    weights do depend on the CPU kernel, so here they are only checked for shape (few pretraining steps
    keep this test short; the full build is `python -m trainpipe.stages.tiny_model --out DIR`)."""
    from safetensors import safe_open

    out = tmp_path / "rebuilt"
    tiny_model.build_tiny_model(out, pretrain_steps=3)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert json.loads((out / name).read_text()) == json.loads((ASSET_DIR / name).read_text()), name
    verify_model_dir(out)
    with safe_open(str(out / "model.safetensors"), "pt") as new, \
            safe_open(str(ASSET_DIR / "model.safetensors"), "pt") as shipped:
        assert set(new.keys()) == set(shipped.keys())
        for key in shipped.keys():
            assert new.get_slice(key).get_shape() == shipped.get_slice(key).get_shape(), key
