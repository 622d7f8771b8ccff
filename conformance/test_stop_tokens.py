"""Generation stop rules: the suite's (llama_spec.generation) against the ones each reference defines itself, and
greedy streams that end at each Llama 3 stop token, for the implementation under test and both references.

Random weights never emit a stop id, so the streams run on crafted weights (fixtures/stop_chains.py): one batch
whose rows end at 128001, 128008 and 128009 at steps 2, 4 and 6. The implementation, Meta's loop and HF `generate`
(with the generation config it read) must give those rows, and the implementation must run no step after its
last row ended (docs/internals.md#stop-tokens).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from adapters import decoding, protocol
from conformance import mutants
from fixtures.checkpoints import write_hf_checkpoint
from fixtures.stop_chains import stop_chains
from llama_spec import generation as rules
from llama_spec.config import preset
from llama_spec.layout import make_mesh
from llama_spec.tokenizer import meta_tokenizer
from parity.check import record_not_checked
from reference.generation import hf_generate, hf_stop_tokens, meta_generate, meta_stop_tokens
from reference.hf import HFReference
from reference.meta import MetaReference

STEPS = (2, 4, 6)              # the step at which each stop id (ascending) ends its row
NEW_TOKENS = max(STEPS) + 3    # room for a row that runs past its stop
PROMPT_LEN = 6


def _config():
    return preset("tiny").replace(vocab_size=meta_tokenizer().n_words)


@functools.lru_cache(maxsize=1)
def crafted():
    """(config, weights, prompts, expected streams): row i, PROMPT_LEN random tokens, ends at llama-models' stop
    id i (ascending) at step STEPS[i] (fixtures/stop_chains.py)."""
    config = _config()
    stops = sorted(meta_stop_tokens())  # the reference's ids, not the suite's rule under test
    assert len(stops) == len(STEPS), f"llama-models has {len(stops)} stop tokens, the crafted batch {len(STEPS)}"
    ids = np.random.default_rng(16).permutation(4096)[:len(STEPS) * PROMPT_LEN]  # ordinary BPE ids, none special
    prompts = ids.reshape(len(STEPS), PROMPT_LEN).tolist()
    weights, expected = stop_chains(config, prompts, stops, STEPS)
    return config, weights, prompts, expected


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    config, weights, _, _ = crafted()
    return write_hf_checkpoint(tmp_path_factory.mktemp("stop_tokens_hf"), config, weights, dtype="float32")


@pytest.fixture(scope="module")
def engines(hf_checkpoint, impl_factory):
    """engine(name, dtype) -> Generation of the crafted prompts, once per module."""
    config, weights, prompts, _ = crafted()
    runs: dict = {}

    def run(name: str, dtype: str):
        if (name, dtype) not in runs:
            if name == "meta":
                meta = MetaReference(config, weights, dtype, max_batch_size=len(prompts),
                                     max_seq_len=PROMPT_LEN + NEW_TOKENS)
                runs[name, dtype] = meta_generate(meta, prompts, NEW_TOKENS)  # llama-models' stop tokens
            elif name == "hf":
                hf = HFReference.from_checkpoint(hf_checkpoint, dtype)
                runs[name, dtype] = hf_generate(hf, prompts, NEW_TOKENS, own_generation_config=True)
            else:
                adapter = runs["adapter", name, dtype] = protocol.build(
                    impl_factory, config, weights, make_mesh(name), dtype, max_batch_size=len(prompts),
                    max_seq_len=PROMPT_LEN + NEW_TOKENS)
                reason = decoding.unsupported(adapter, prompts)
                runs[name, dtype] = reason or decoding.greedy(adapter, prompts, NEW_TOKENS)  # the suite's rule
        return runs[name, dtype]

    run.adapter = lambda mesh, dtype: (run(mesh, dtype), runs["adapter", mesh, dtype])[1]
    return run


def _names(ids) -> str:
    by_id = {v: k for k, v in rules.STOP_TOKENS.items()}
    return ", ".join(f"{t} {by_id.get(t, '(not a Llama 3 stop token)')}" for t in sorted(ids))


def _compare_rules(theirs: tuple[int, ...], who: str) -> None:
    __tracebackhide__ = True
    ours = set(rules.stop_tokens())
    missing, extra = set(theirs) - ours, ours - set(theirs)
    if missing or extra:
        raise AssertionError(f"stop tokens: the suite's llama_spec.generation.stop_tokens() {sorted(ours)} differ "
                             f"from {who} {sorted(theirs)}: the suite lacks [{_names(missing)}], has extra "
                             f"[{_names(extra)}]")


def test_suite_stop_tokens_are_meta_tokenizers():
    """llama-models' Tokenizer.stop_tokens (its tokenizer.model, its special-token names) is the suite's set."""
    tokenizer = meta_tokenizer()
    _compare_rules(meta_stop_tokens(), "llama-models' Tokenizer.stop_tokens")
    names = {name: tokenizer.special_tokens[name] for name in rules.STOP_TOKENS}
    assert names == rules.STOP_TOKENS, f"llama-models names the stop ids {names}, the suite {rules.STOP_TOKENS}"


def test_suite_stop_tokens_are_hf_generation_configs(hf_checkpoint):
    """eos_token_id of the checkpoint's generation_config.json, as transformers reads it, is the suite's set."""
    _compare_rules(hf_stop_tokens(hf_checkpoint), "transformers' GenerationConfig.from_pretrained eos_token_id")


def test_references_end_each_row_at_its_stop_token(engines, dtype):
    """Meta's loop and HF's generate (each with its own rule) end each crafted row where it was crafted to end:
    the streams are right, before anything is judged by them."""
    _, _, _, expected = crafted()
    for name in ("meta", "hf"):
        got = engines(name, dtype).tokens
        assert got == expected, f"{name} {dtype}: rows {got}, crafted to be {expected}"


def test_model_stops_like_reference(request, engines, reference, dtype, mesh):
    """The implementation under test, decoding by the suite's stop rule, ends every row at the step and with the
    token the reference's own rule ends it, and runs no step after the last row ended."""
    if reference == "oracle":
        pytest.skip("the float64 oracle has no decoding loop; stop tokens are checked against meta and hf")
    _, _, prompts, crafted_rows = crafted()
    ours = engines(mesh, dtype)
    if isinstance(ours, str):
        record_not_checked(request, component="generation", names=["stop tokens"], reason=ours,
                           reference=reference, dtype=dtype, mesh=mesh)
        pytest.skip(ours)
    theirs = engines(reference, dtype).tokens
    by_id = {v: k for k, v in rules.STOP_TOKENS.items()}
    problems = []
    for i, (a, b) in enumerate(zip(ours.tokens, theirs)):
        if a != b:
            end = by_id.get(b[-1], "max_new_tokens")
            problems.append(f"row {i} (ends at {end} step {len(b) - 1} for {reference}): the implementation gave "
                            f"{len(a)} tokens {a}, {reference} {len(b)} tokens {b}")
    assert not problems, f"stop tokens, {mesh} {dtype} vs {reference}:\n  " + "\n  ".join(problems)
    steps = max(map(len, theirs))
    assert len(ours.step_logits) == steps, \
        f"stop tokens, {mesh} {dtype}: {len(ours.step_logits)} decode steps, but every row had ended after {steps}"
    assert theirs == crafted_rows, f"{reference} {dtype} rows {theirs}, crafted to be {crafted_rows}"


@pytest.mark.parametrize("name", ["stop_without_eot", "stop_one_token_late"])
def test_planted_stop_rule_fault_is_caught(engines, name):
    """The planted faults of the suite's stop rule (conformance/mutants.py) make the implementation's rows differ
    from Meta's (the decoding loop runs in Python: the built model is reused), and a missing id is named."""
    _, _, prompts, expected = crafted()
    adapter = engines.adapter("1x1", "float32")
    if isinstance(engines("1x1", "float32"), str):
        pytest.skip(engines("1x1", "float32"))
    with mutants.planted(name):
        rows = decoding.greedy(adapter, prompts, NEW_TOKENS).tokens
        if name == "stop_without_eot":
            with pytest.raises(AssertionError, match="lacks \\[128009 <\\|eot_id\\|>\\]"):
                _compare_rules(meta_stop_tokens(), "llama-models' Tokenizer.stop_tokens")
    assert rows != expected == engines("meta", "float32").tokens, f"{name}: rows {rows} still as crafted"
