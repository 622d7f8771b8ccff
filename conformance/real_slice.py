"""Inputs and cached reference results of the real-model slice (conformance/test_real_model.py).

The slice's model is a real trained one: by default the pinned SmolLM2-135M-Instruct (fixtures/real_model.py,
dequantized to float32), or the checkpoint `--checkpoint-dir` names (use_checkpoint, before collection). Its text
is real chat: the checked-in prompts of fixtures/real_text/prompts.json, each rendered by the model's own chat
template (plain text after BOS for a tokenizer without one). A case's prompts are right-padded into one batch:
the model is causal, so a prompt's positions do not see the padding after them, and only those positions are
compared (`valid`). Every reference result depends on (case, reference, dtype), never on the mesh, so it is
computed once per process. As in support.py, the float64 oracle computes with the weights rounded to the run
dtype, so its distance to each side measures only that side's arithmetic.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest

from conformance.support import rounded
from fixtures import extremes, real_model
from llama_spec.checkpoint import CheckpointError, load_checkpoint, load_tokenizer
from llama_spec.config import LlamaConfig
from llama_spec.layout import check_splittable
from llama_spec.tokenizer import meta_tokenizer
from parity import metrics as pm
from parity.check import record_not_checked
from reference import hf, meta, oracle

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "real_text" / "prompts.json"
MESHES: tuple[str, ...] = ("1x1", "1x3")  # 9 query / 3 kv heads: the model axis splits them at 3, not at 4
FULL_MESHES: tuple[str, ...] = ("2x3",)  # marker real_full
# The model axes tried, smallest first, for a --checkpoint-dir model's sharded mesh
MODEL_AXES = (2, 3, 4)
LLAMA3_VOCAB = 128256  # a checkpoint without tokenizer files but with this vocabulary is read with Llama 3's
PAD = 2  # <|im_end|>: any id serves, the positions after a prompt's end are never compared


@dataclasses.dataclass(frozen=True)
class Case:
    prompt_ids: tuple[str, ...]  # ids of prompts.json


# The default run's case: the four prompts marked default (37 to 63 tokens), one batch. Under real_full, every
# prompt: the short ones in one batch, the 194- and 507-token ones alone.
CASES = {
    "chat": Case(("capital", "arithmetic", "code", "translate")),
    "chat_more": Case(("haiku", "list", "definition", "email")),
    "summary": Case(("summary",)),
    "long": Case(("long",)),
}
FULL_CASES = ("chat_more", "summary", "long")

# A public-domain text for perplexity, as a language model reads plain text (the tokenizer's own encoding, no chat
# template): the opening of the Constitution of the United States (1787; a work in the public domain), from the
# Preamble into Article I, Section 8, about 2,000 tokens. Only the golden check reads it.
TEXT_FILE = PROMPTS_FILE.parent / "constitution.txt"
TEXT_CASE = "constitution"
GOLDEN_CASES = (*CASES, TEXT_CASE)


# The checkpoint --checkpoint-dir names, or None for the pinned real model
CHECKPOINT: Path | None = None


PINNED_MESHES = MESHES, FULL_MESHES


def use_checkpoint(directory: str | Path | None) -> None:
    """Make the checkpoint in `directory` the slice's model (None: the pinned one again): its config, weights,
    tokenizer and meshes. Called by the plugin before collection, so the test modules' mesh parameters are the
    checkpoint's; raises CheckpointError (one line) for a directory that is not a checkpoint."""
    global CHECKPOINT, MESHES, FULL_MESHES
    if directory is None:
        CHECKPOINT, (MESHES, FULL_MESHES) = None, PINNED_MESHES
    else:
        found, _ = load_checkpoint(directory)
        CHECKPOINT, (MESHES, FULL_MESHES) = Path(directory), meshes_for(found)
    for cached in (_user_checkpoint, model_weights, _tokenizers, prompts, tokens, weights, exact, full_forward,
                   outlier_layers):
        cached.cache_clear()


def meshes_for(config: LlamaConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(default meshes, real_full meshes): 1x1 and the smallest model axis that splits the model, then 2x it."""
    for axis in MODEL_AXES:
        try:
            check_splittable(config, axis)
        except ValueError:
            continue
        return ("1x1", f"1x{axis}"), (f"2x{axis}",)
    return ("1x1",), ()


def name() -> str:
    """What messages call the slice's model."""
    return real_model.NAME if CHECKPOINT is None else str(CHECKPOINT)


def has_golden_data() -> bool:
    """The checked-in golden data holds the pinned model's log-probs, no other's."""
    return CHECKPOINT is None


@functools.lru_cache(maxsize=1)
def _user_checkpoint():
    assert CHECKPOINT is not None, "use_checkpoint first"
    return load_checkpoint(CHECKPOINT)


def config() -> LlamaConfig:
    return real_model.checkpoint().config if CHECKPOINT is None else _user_checkpoint()[0]


@functools.lru_cache(maxsize=1)
def model_weights() -> dict[str, np.ndarray]:
    """The slice model's float32 Meta-layout weights, read once per process (treat as read-only)."""
    if CHECKPOINT is None:
        return real_model.weights()
    lazy = _user_checkpoint()[1]
    return {n: np.ascontiguousarray(lazy[n], dtype=np.float32) for n in lazy}


@functools.lru_cache(maxsize=1)
def _tokenizers():
    """(HF tokenizer or None, Meta tokenizer or None) of the slice's model; both None: no text side."""
    if CHECKPOINT is None:
        return real_model.tokenizer(), None
    import transformers  # heavy: only for a user's checkpoint

    if any((CHECKPOINT / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(CHECKPOINT), None
    try:
        meta_side = load_tokenizer(CHECKPOINT, config())
    except CheckpointError:  # a Meta checkpoint without tokenizer.model: unavailable() says so
        meta_side = None
    if meta_side is None and config().vocab_size == LLAMA3_VOCAB:
        meta_side = meta_tokenizer()
    return None, meta_side


def unavailable() -> str | None:
    """Why the slice cannot run on its model (a --checkpoint-dir without any tokenizer), or None."""
    if any(_tokenizers()):
        return None
    return (f"not checked: {CHECKPOINT} ships no tokenizer (tokenizer.json or tokenizer.model) and its vocab_size "
            f"{config().vocab_size} is not Llama 3's, so the real slice has no text to run; add the model's "
            "tokenizer files to the directory")


def skip_unless_text(request, *, component: str, names: list[str], **scope) -> None:
    """End a check not checked (recorded) when the slice's model has no text side."""
    reason = unavailable()
    if reason:
        record_not_checked(request, component=component, names=names, reason=reason, **scope)
        pytest.skip(reason)


def decode(ids) -> str:
    hf_side, meta_side = _tokenizers()
    return hf_side.decode(ids) if hf_side is not None else meta_side.decode(list(ids))


@functools.lru_cache(maxsize=1)
def prompt_texts() -> dict[str, str]:
    return {p["id"]: p["text"] for p in json.loads(PROMPTS_FILE.read_text())["prompts"]}


def chat_ids(text: str) -> list[int]:
    """One user turn through the model's own chat template, ending with the assistant's generation prompt; a
    tokenizer without a template encodes the text after BOS."""
    hf_side = _tokenizers()[0]
    if hf_side is None or not hf_side.chat_template:
        return plain_ids(text)
    encoded = hf_side.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(encoded["input_ids"])


def plain_ids(text: str) -> list[int]:
    """The text as the model's tokenizer encodes plain text (with BOS where the tokenizer adds one)."""
    hf_side, meta_side = _tokenizers()
    if hf_side is None:
        assert meta_side is not None, unavailable()
        return meta_side.encode(text, bos=True, eos=False)
    return list(hf_side(text)["input_ids"])


@functools.lru_cache(maxsize=None)
def prompts(case: str) -> tuple[tuple[int, ...], ...]:
    if case == TEXT_CASE:
        return (tuple(plain_ids(TEXT_FILE.read_text())),)
    return tuple(tuple(chat_ids(prompt_texts()[i])) for i in CASES[case].prompt_ids)


@functools.lru_cache(maxsize=None)
def tokens(case: str) -> np.ndarray:
    """(batch, longest) int32, each prompt right-padded with PAD."""
    rows = prompts(case)
    out = np.full((len(rows), max(map(len, rows))), PAD, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def valid(case: str, x: np.ndarray) -> np.ndarray:
    """x (batch, seq, ...) -> (prompt positions, ...): every prompt's own positions, the padding dropped."""
    return np.concatenate([np.asarray(x)[i, :len(row)] for i, row in enumerate(prompts(case))], axis=0)


@functools.lru_cache(maxsize=2)
def weights(dtype: str) -> dict[str, np.ndarray]:
    """The real weights as the run dtype sees them (what the oracle computes with)."""
    return {k: rounded(v, dtype) for k, v in model_weights().items()}


@functools.lru_cache(maxsize=4)
def exact(dtype: str, case: str):
    """The float64 oracle's (logits, intermediates) on the case, padding dropped (the text's: logits only)."""
    out = oracle.oracle_forward(config(), weights(dtype), tokens(case), 0, capture=case != TEXT_CASE)
    return _valid_pair(case, out)


def _valid_pair(case: str, out) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A forward's logits, or (logits, intermediates), as (logits, intermediates) over the valid positions."""
    logits, taps = out if isinstance(out, tuple) else (out, {})
    return valid(case, logits), {k: valid(case, v) for k, v in taps.items()}


@functools.lru_cache(maxsize=4)
def full_forward(reference: str, dtype: str, case: str):
    """The reference's (logits, intermediates) on the case, padding dropped (the text's: logits only)."""
    toks, capture = tokens(case), case != TEXT_CASE
    if reference == "meta":
        ref = meta.MetaReference(config(), model_weights(), dtype, max_batch_size=toks.shape[0],
                                 max_seq_len=toks.shape[1])
        out = ref.forward(toks, 0, capture=capture)
    elif reference == "hf":
        out = hf.HFReference(config(), model_weights(), dtype).forward(toks, 0, capture=capture)
    else:
        raise ValueError(f"--reference {reference}: full-model references are meta and hf")
    return _valid_pair(case, out)


def peer(reference: str) -> str:
    """The other official reference: bounds widen to whichever of the two is farther from exact math."""
    return {"meta": "hf", "hf": "meta"}[reference]


def residual_inputs(dtype: str) -> list[np.ndarray]:
    """The residual stream entering each layer on the default case (the embedding, then each block_out), from
    the oracle, as (1, positions, dim)."""
    _, taps = exact(dtype, "chat")
    streams = [taps["embedding"]] + [taps[f"layers.{i}.block_out"] for i in range(config().n_layers - 1)]
    return [s[None] for s in streams]


@functools.lru_cache(maxsize=2)
def outlier_layers(dtype: str, count: int = 2) -> tuple[int, ...]:
    """The `count` layers whose residual input holds the largest outliers (max/median), in layer order."""
    ratios = [extremes.outlier_ratio(x) for x in residual_inputs(dtype)]
    return tuple(sorted(np.argsort(ratios)[::-1][:count].tolist()))


def component_input(dtype: str, layer: int, which: str) -> np.ndarray:
    """A real activation from the oracle's forward, rounded to the run dtype, shaped (1, positions, dim):
    'residual' (what layer `layer` receives), 'attention_norm' or 'ffn_norm' (that layer's normed inputs)."""
    if which == "residual":
        x = residual_inputs(dtype)[layer]
    else:
        x = exact(dtype, "chat")[1][f"layers.{layer}.{which}"][None]
    return rounded(x, dtype)


# ---- golden data: what the references say, kept, so any implementation is judged without running them ----------

GOLDEN_FILE = PROMPTS_FILE.parent / "golden.npz"
GOLDEN_TOPK = 20
DTYPES = ("float32", "bfloat16")


def next_token_nll(case: str, logprobs: np.ndarray) -> np.ndarray:
    """Per predicted token, -log p(next token): each prompt's positions 0 .. n-2 predicting tokens 1 .. n-1
    (`logprobs` over the case's valid positions, as `valid` lays them out)."""
    out, start = [], 0
    for row in prompts(case):
        n = len(row)
        out.append(-logprobs[start + np.arange(n - 1), np.asarray(row[1:])])
        start += n
    return np.concatenate(out)


def golden_arrays(case: str) -> dict[str, np.ndarray]:
    """Per position of the case: the float64 oracle's top-20 token ids on the float32 weights, and at those ids the
    log-probs of the oracle and of HF, at each dtype (the oracle on the weights rounded to it), plus each side's
    next-token NLL for perplexity."""
    out: dict[str, np.ndarray] = {}
    for dtype in DTYPES:
        oracle_lp = pm.log_softmax(exact(dtype, case)[0])
        hf_lp = pm.log_softmax(full_forward("hf", dtype, case)[0])
        if dtype == "float32":
            out["ids"] = np.argsort(-oracle_lp, axis=-1, kind="stable")[:, :GOLDEN_TOPK].astype(np.int32)
        ids = out["ids"]
        out[f"oracle_{dtype}"] = np.take_along_axis(oracle_lp, ids, -1).astype(np.float32)
        out[f"hf_{dtype}"] = np.take_along_axis(hf_lp, ids, -1).astype(np.float32)
        out[f"oracle_nll_{dtype}"] = next_token_nll(case, oracle_lp).astype(np.float32)
        out[f"hf_nll_{dtype}"] = next_token_nll(case, hf_lp).astype(np.float32)
    return out


@functools.lru_cache(maxsize=1)
def golden() -> dict[str, dict[str, np.ndarray]]:
    """case -> golden arrays, from the checked-in file; a file taken from other prompts is refused."""
    data = np.load(GOLDEN_FILE)
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
        case, _, name = key.partition("/")
        out.setdefault(case, {})[name] = data[key]
    for case, arrays in out.items():
        positions = sum(map(len, prompts(case)))
        if arrays["ids"].shape[0] != positions:
            raise ValueError(f"{GOLDEN_FILE}: case {case} has {arrays['ids'].shape[0]} positions, the prompts "
                             f"{positions}; regenerate it: python -m conformance.real_slice --write-golden")
    return out


def write_golden(path: Path = GOLDEN_FILE) -> None:
    arrays = {f"{case}/{name}": value for case in GOLDEN_CASES for name, value in golden_arrays(case).items()}
    np.savez_compressed(path, **arrays)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m conformance.real_slice",
                                     description="Regenerate the real model's golden data (top-20 ids and the "
                                                 "float64 oracle's and HF's log-probs per prompt position).")
    parser.add_argument("--write-golden", action="store_true", help=f"write {GOLDEN_FILE}")
    args = parser.parse_args(argv)
    if not args.write_golden:
        parser.print_help()
        return 2
    try:
        write_golden()
    except real_model.RealModelError as err:
        print(f"error: {err}")
        return 2
    print(f"{GOLDEN_FILE}: {len(GOLDEN_CASES)} cases, top-{GOLDEN_TOPK}, dtypes {', '.join(DTYPES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
