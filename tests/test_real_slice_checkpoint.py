"""`--checkpoint-dir DIR` makes DIR's model the real slice's (conformance/real_slice.py use_checkpoint): its config,
weights, tokenizer and meshes; a checkpoint the slice has no text for ends not checked; and end to end, the slice
judges --impl on DIR and fails a planted fault there.

(No argument here may be named `mesh`, `dtype` or `reference`: the suite's plugin parametrizes those.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import real_slice
from fixtures.checkpoints import SPECIAL_TOKENS, write_hf_checkpoint, write_meta_checkpoint
from llama_spec.config import preset

ROOT = Path(__file__).resolve().parents[1]
TINY = preset("tiny")  # 8 heads / 2 kv heads: the smallest model axis that splits it is 2


@pytest.fixture
def slice_on():
    """Point the slice at a directory for one test, then back at the pinned model."""
    yield real_slice.use_checkpoint
    real_slice.use_checkpoint(None)


def test_a_checkpoint_dir_becomes_the_slices_model(tmp_path, slice_on):
    directory = write_meta_checkpoint(tmp_path / "meta", TINY, dtype="float32")  # with tokenizer.model
    slice_on(directory)
    assert real_slice.config() == TINY.replace(max_seq_len=real_slice.config().max_seq_len)
    assert (real_slice.MESHES, real_slice.FULL_MESHES) == (("1x1", "1x2"), ("2x2",))
    assert real_slice.name() == str(directory) and not real_slice.has_golden_data()
    assert real_slice.unavailable() is None
    weights = real_slice.model_weights()
    assert weights["tok_embeddings.weight"].shape == (TINY.vocab_size, TINY.dim)
    first = real_slice.prompts("chat")[0]
    text = real_slice.prompt_texts()["capital"]
    bos = TINY.vocab_size - SPECIAL_TOKENS  # Llama 3's <|begin_of_text|>: the first special id
    assert first[0] == bos and real_slice.decode(first[1:]) == text  # no chat template: BOS, then the text


def test_the_pinned_model_comes_back(tmp_path, slice_on):
    slice_on(write_meta_checkpoint(tmp_path / "meta", TINY, dtype="float32"))
    slice_on(None)
    assert real_slice.CHECKPOINT is None and real_slice.has_golden_data()
    assert (real_slice.MESHES, real_slice.FULL_MESHES) == real_slice.PINNED_MESHES


def test_a_checkpoint_without_a_tokenizer_is_not_checked(tmp_path, slice_on):
    slice_on(write_hf_checkpoint(tmp_path / "hf", TINY, dtype="float32"))  # no tokenizer files, vocab 512
    reason = real_slice.unavailable()
    assert reason and reason.startswith("not checked: ") and "ships no tokenizer" in reason and str(tmp_path) in reason


def test_a_model_no_small_axis_splits_runs_on_one_device_only():
    assert real_slice.meshes_for(TINY.replace(n_heads=5, n_kv_heads=5, dim=5 * TINY.head_dim)) == (("1x1",), ())


SELECTION = "test_real_logits and meta-float32-chat or test_real_mesh_invariance and float32"


def _slice_run(directory: Path, json_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "conformance/test_real_model.py",
               "-k", SELECTION, "--checkpoint-dir", str(directory), "--parity-json", str(json_path), *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_the_slice_judges_the_checkpoint_and_fails_a_planted_fault(tmp_path):
    """On a tiny checkpoint: the logits on 1x1 and mesh invariance on 1x2 (the checkpoint's mesh, not the pinned
    model's 1x3) pass, and fail once a bug is planted in the subject."""
    directory = write_meta_checkpoint(tmp_path / "meta", TINY, dtype="float32")
    clean = _slice_run(directory, tmp_path / "clean.json")
    assert clean.returncode == 0 and "2 passed" in clean.stdout, clean.stdout[-3000:] + clean.stderr[-2000:]
    records = json.loads((tmp_path / "clean.json").read_text())["records"]
    assert {(r["component"], r["mesh"]) for r in records} >= {("logits", "1x1"), ("tp_invariance", "1x2")}
    planted = _slice_run(directory, tmp_path / "planted.json", "--mutant", "rmsnorm_eps")
    assert planted.returncode == 1, planted.stdout[-3000:]
    failed = [r for r in json.loads((tmp_path / "planted.json").read_text())["records"] if not r["passed"]]
    assert failed and failed[0]["name"] == "real.chat.logits", failed[:1]
