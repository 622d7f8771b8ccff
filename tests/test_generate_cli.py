"""`python -m tp_llama.generate`: what it prints, which engine and weights it runs, how it refuses bad requests.

The engines' numerical agreement is generation parity (test_generation.py, whose "text" case decodes with
these very synthetic weights: the tiny preset with the tokenizer's vocabulary, seed 0); here only the command
line is under test, and that it stops at each Llama 3 stop token (crafted weights, fixtures/stop_chains.py).
Errors must be one line on stderr, exit code 2, no traceback.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.checkpoints import write_meta_checkpoint
from fixtures.stop_chains import stop_chains
from llama_spec.config import preset
from llama_spec.generation import STOP_TOKENS
from llama_spec.tokenizer import load_meta_tokenizer, meta_tokenizer
from reference import generation as reference_generation
from tp_llama.generate import greedy_generate, main

# The built-in model's own command line: not checked under another --impl.
pytestmark = pytest.mark.usefixtures("builtin_only")

PROMPT = "The capital of France is"
ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m tp_llama.generate"


def run(capsys, *argv: str, command=main) -> tuple[int, str, str]:
    """A command's main() in this process: (exit code, stdout, stderr); argparse's own exits included."""
    try:
        code = command(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def parse(out: str) -> dict[str, object]:
    """The four lines printed per prompt: prompt text, prompt ids, new ids, new text."""
    fields = dict(re.findall(r"^(prompt|prompt ids|new ids|text)(?: \(\d+\))?: (.*)$", out, re.MULTILINE))
    assert set(fields) == {"prompt", "prompt ids", "new ids", "text"}, f"unexpected output:\n{out}"
    return {key: ast.literal_eval(value) for key, value in fields.items()}


@pytest.fixture(scope="module")
def meta_tok():
    return meta_tokenizer()


def test_prints_prompt_ids_new_ids_and_their_text(capsys, meta_tok):
    code, out, err = run(capsys, "--mesh", "1x4", "--prompt", PROMPT, "--max-new-tokens", "8", "--no-progress")
    assert code == 0, f"exit code {code}; stderr:\n{err}"
    shown = parse(out)
    assert shown["prompt"] == PROMPT
    assert shown["prompt ids"] == meta_tok.encode(PROMPT, bos=True, eos=False), "prompt ids are not Meta's encoding"
    assert len(shown["new ids"]) == 8, f"asked for 8 new tokens, printed {shown['new ids']}"
    assert shown["text"] == meta_tok.decode(shown["new ids"]), "the text line is not the decoding of the new ids"


@pytest.mark.parametrize("engine, header", [(None, "tp_llama 1x1 float32"), ("meta", "meta float32"),
                                            ("hf", "hf float32")])
def test_each_engine_announces_itself_and_progress_reports_every_token(capsys, engine, header):
    """The built-in's command and the references' (`python -m reference.generation --reference X`) take the same
    options; each engine announces itself on the progress line and reports every token; all decode alike."""
    args = ["--prompt", PROMPT, "--max-new-tokens", "4", "--progress"]
    if engine is None:
        code, out, err = run(capsys, "--mesh", "1x1", *args)
    else:
        code, out, err = run(capsys, *args, "--reference", engine, command=reference_generation.main)
    assert code == 0, f"exit code {code}; stderr:\n{err}"
    assert err.startswith(header), f"progress header should name the engine ({header!r}); stderr:\n{err}"
    assert "token 4/4" in err, f"progress line never reached token 4/4; stderr:\n{err}"
    assert len(parse(out)["new ids"]) == 4


def test_checkpoint_dir_runs_its_weights_and_its_tokenizer(capsys, tmp_path, tiny_config, tiny_weights, tp_model):
    """A Meta checkpoint of the canonical tiny weights, with its own 512-id tokenizer: the command prints that
    tokenizer's ids and exactly the tokens greedy_generate gives on the same weights and mesh."""
    write_meta_checkpoint(tmp_path, tiny_config, tiny_weights, dtype="float32")
    code, out, err = run(capsys, "--checkpoint-dir", str(tmp_path), "--mesh", "1x4", "--prompt", "Hello world",
                         "--max-new-tokens", "12", "--no-progress")
    assert code == 0, f"exit code {code}; stderr:\n{err}"
    shown = parse(out)
    tokenizer = load_meta_tokenizer(tmp_path / "tokenizer.model")
    assert shown["prompt ids"] == tokenizer.encode("Hello world", bos=True, eos=False), \
        "prompt ids are not the checkpoint tokenizer's encoding"
    expected = greedy_generate(*tp_model("1x4", "float32"), [shown["prompt ids"]], 12,
                               stop_tokens=tokenizer.stop_tokens)
    assert shown["new ids"] == expected.tokens[0], "the command did not decode with the checkpoint's weights"


# Per Llama 3 stop token: a prompt, and the step at which the crafted weights end its greedy stream there.
STOP_RUNS = [("<|end_of_text|>", "The capital of France is", 2), ("<|eom_id|>", "Hello world", 4),
             ("<|eot_id|>", "Once upon a time", 6)]
STOP_NEW_TOKENS = 9  # room for a stream that runs past its stop


@pytest.fixture(scope="module")
def stop_checkpoint(tmp_path_factory, meta_tok):
    """(directory, stop id -> crafted stream): a Meta checkpoint of the tiny width with Llama 3's vocabulary and
    tokenizer whose greedy stream after each STOP_RUNS prompt ends at that run's stop id at its step."""
    config = preset("tiny").replace(vocab_size=meta_tok.n_words)
    prompts = [meta_tok.encode(text, bos=True, eos=False) for _, text, _ in STOP_RUNS]
    stops = [STOP_TOKENS[name] for name, _, _ in STOP_RUNS]
    weights, streams = stop_chains(config, prompts, stops, [step for _, _, step in STOP_RUNS])
    directory = write_meta_checkpoint(tmp_path_factory.mktemp("stop_chains"), config, weights, dtype="float32")
    return directory, dict(zip(stops, streams))


@pytest.mark.parametrize("name, text, step", STOP_RUNS, ids=["end_of_text", "end_of_message", "end_of_turn"])
def test_stops_at_each_stop_token(capsys, stop_checkpoint, name, text, step):
    """The command's own loop ends the new ids at each Llama 3 stop token, kept, and runs no decode step after."""
    directory, streams = stop_checkpoint
    stop = STOP_TOKENS[name]
    code, out, err = run(capsys, "--checkpoint-dir", str(directory), "--prompt", text, "--max-new-tokens",
                         str(STOP_NEW_TOKENS), "--progress")
    assert code == 0, f"exit code {code}; stderr:\n{err}"
    new, expected = parse(out)["new ids"], streams[stop]
    assert new == expected, f"{name} {stop}: the weights make {text!r} end there at step {step} ({expected}); the " \
                            f"command printed new ids {new}"
    ran = max((int(k) for k in re.findall(r"token (\d+)/", err)), default=0)
    assert ran == step + 1, f"{name} {stop}: the command ran {ran} decode steps, but its only row had ended after " \
                            f"{step + 1}"


LONG_TEXT = "word " * 17000  # 17001 ids with BOS, past the tiny preset's max_seq_len of 16384


@pytest.mark.parametrize("argv, says", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", LONG_TEXT, "--max-new-tokens", "1"], "more than max_seq_len 16384"),
    (["--prompt", PROMPT, "--max-new-tokens", "16380"], "exceeds max_seq_len 16384"),
    (["--prompt", PROMPT, "--max-new-tokens", "0"], "at least one new token"),
    (["--prompt", PROMPT, "--mesh", "4"], "not of the form DxM"),
    (["--prompt", PROMPT, "--mesh", "1x3"], "cannot shard over a model axis of 3"),
    (["--prompt", PROMPT, "--checkpoint-dir", "/nonexistent"], "/nonexistent: no such checkpoint directory"),
    (["--max-new-tokens", "4"], "required: --prompt"),
    (["--prompt", PROMPT, "--dtype", "float16"], "invalid choice"),
], ids=["empty", "prompt_too_long", "new_tokens_too_many", "no_new_tokens", "bad_mesh", "unsplittable_mesh",
        "checkpoint_dir", "no_prompt", "bad_dtype"])
def test_bad_requests_fail_with_one_line_and_exit_code_2(capsys, argv, says):
    code, out, err = run(capsys, *argv)
    assert code == 2, f"exit code {code} (expected 2); stderr:\n{err}"
    assert out == "", f"nothing belongs on stdout after an error, got:\n{out}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), f"expected one error line, got:\n{err}"
    assert says in lines[0], f"the error should say {says!r}: {lines[0]}"


@pytest.mark.e2e
def test_module_entry_point_runs_and_fails_cleanly():
    """As users run it: a fresh process, real exit codes, no traceback on a bad request."""
    command = [sys.executable, "-m", "tp_llama.generate", "--prompt", PROMPT, "--max-new-tokens", "2",
               "--mesh", "1x4"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit code {done.returncode}; stderr:\n{done.stderr[-3000:]}"
    assert len(parse(done.stdout)["new ids"]) == 2
    bad = subprocess.run([*command[:3], "--prompt", ""], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines() == [f"{PROG}: error: prompt 0 is empty; give some text to continue"]
