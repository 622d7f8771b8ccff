"""Generation parity: greedy decoding by the implementation under test against Meta's and HF's own decoding loops.

The implementation on each --mesh (through its Decode capability and the suite's one loop, adapters/decoding.py),
HF `generate` and Meta's KV-cache loop decode the same prompts; each pair is checked teacher-forced (per-step `kl`
and `top1` after the same history) and free-running (the same tokens, or a first parting at a near-tie). Both drive
the decode path, so a decode-only bug fails here while prefill tests pass; a missing `pad` or `offset` is not
checked, with the reason (docs/internals.md#generation-parity, docs/results.md#generation-prompts).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from adapters import decoding, protocol
from conformance import real_slice, support
from llama_spec.config import preset
from llama_spec.generation import Generation
from llama_spec.layout import make_mesh, parse_mesh
from llama_spec.synthetic import make_tokens, make_weights
from llama_spec.tokenizer import meta_tokenizer
from parity import assert_parity
from parity import metrics as pm
from parity.check import record_not_checked
from parity.tolerances import bounds_for
from reference import oracle
from reference.generation import hf_generate, meta_generate, meta_stop_tokens
from reference.hf import HFReference
from reference.meta import MetaReference
from reference.tokenizer import hf_encode
from tp_llama.generate import greedy_generate


@dataclasses.dataclass(frozen=True)
class Case:
    """One decoding run: random prompts of `lengths` (tiny vocabulary) or `texts` (Llama 3 tokenizer)."""
    lengths: tuple[int, ...] = ()
    texts: tuple[str, ...] = ()
    chat: tuple[str, ...] = ()  # prompts of fixtures/real_text/prompts.json, on the real model
    new_tokens: int = 16
    start_pos: int = 0  # RoPE position of every prompt's first token


CASES = {
    # Short prompts of different lengths, a 1-token one among them, in one batch: left padding (JAX, HF) against
    # Meta's lockstep over right-aligned rows.
    "batch": Case(lengths=(1, 4, 11, 18), new_tokens=24),
    # Relative distances of hundreds of tokens, where RoPE and its 3.1 scaling are far from the identity.
    "long": Case(lengths=(480,), new_tokens=24),
    # Absolute positions cross 8192 while decoding (float32 phases, RoPE tables past the original context),
    # nothing before the prompt. Same shapes as "long": one compiled prefill and decode step serve both.
    "past_8192": Case(lengths=(480,), new_tokens=24, start_pos=8192 - 480 - 8),
    # Tokenizer prompts on the tiny width with Llama 3's 128256-token vocabulary (the CLI's synthetic model).
    "text": Case(texts=("The capital of France is", "def fibonacci(n):\n    "), new_tokens=16),
    # A real 8200-token prefix: relative distances past 8192, where the scaled long wavelengths matter.
    "past_8192_full": Case(lengths=(8200,), new_tokens=8),
    # The real trained model (fixtures/real_model.py) on two chat prompts of 37 and 54 tokens, left-padded into one
    # batch, 32 tokens each: its vocabulary holds no Llama 3 stop id, so every engine runs all 32 steps.
    "real_chat": Case(chat=("capital", "code"), new_tokens=32),
}
REAL = {"real_chat"}  # meshes of the real model's 9/3 heads: test_real_* below
# Eight 8200-token prefills, each with about 2 GB of attention scores: minutes on 2 CPU cores.
SLOW = {"past_8192_full"}
case_names = pytest.mark.parametrize(
    "case_name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else []) for name in CASES
                  if name not in REAL])


# ---- the engines, each run once per module ------------------------------------------------------------------


class Engines:
    """Every engine's generation of every case, computed on first use and kept for the module.

    An engine is "meta", "hf" or a mesh ("1x4": the implementation under test on it). With a teacher (a
    Generation), the engine is fed the teacher's tokens; when its own tokens are the teacher's, that is its free run.
    """

    def __init__(self, impl, factory, tiny_weights):
        self.impl, self.factory = impl, factory
        self.tiny_weights = tiny_weights
        self.runs: dict = {}

    def _once(self, key, make):
        if key not in self.runs:
            self.runs[key] = make()
        return self.runs[key]

    @functools.cached_property
    def text_config(self):
        return preset("tiny").replace(vocab_size=meta_tokenizer().n_words)

    def config(self, case: Case):
        if case.chat:
            return real_slice.config()
        return self.text_config if case.texts else support.CONFIG

    def weights(self, case: Case):
        if case.chat:
            return real_slice.model_weights()
        if not case.texts:
            return self.tiny_weights
        return self._once("text weights", lambda: make_weights(self.text_config, seed=0))

    def prompts(self, case: Case) -> list[list[int]]:
        return self._once(("prompts", case), lambda: _encode(case))

    def label(self, engine: str) -> str:
        return engine if engine in ("meta", "hf") else f"{protocol.name_of(self.factory)} {engine}"

    def adapter(self, case: Case, mesh: str, dtype: str):
        """The implementation under test on `mesh`: the session's build, or for the text case one built through
        the same factory with the Llama 3 vocabulary."""
        if not case.texts and not case.chat:
            return self.impl(mesh, dtype)
        prompts = self.prompts(case)
        return self._once((case, mesh, dtype), lambda: protocol.build(
            self.factory, self.config(case), self.weights(case), make_mesh(mesh), dtype, max_batch_size=len(prompts),
            max_seq_len=case.start_pos + max(map(len, prompts)) + case.new_tokens))

    def generate(self, engine: str, case: Case, dtype: str, teacher=None):
        free = self._once((engine, case, dtype, None), lambda: self._run(engine, case, dtype, None))
        if teacher is None or teacher.tokens == free.tokens:
            return free
        key = tuple(map(tuple, teacher.tokens))
        return self._once((engine, case, dtype, key), lambda: self._run(engine, case, dtype, teacher.tokens))

    def _run(self, engine: str, case: Case, dtype: str, teacher):
        prompts, config = self.prompts(case), self.config(case)
        options = dict(start_pos=case.start_pos, teacher=teacher)
        if engine == "meta":
            meta = self._once(("meta model", case, dtype), lambda: MetaReference(
                config, self.weights(case), dtype, max_batch_size=len(prompts),
                max_seq_len=max(map(len, prompts)) + case.new_tokens))
            return meta_generate(meta, prompts, case.new_tokens, **options)
        if engine == "hf":
            hf = self._once(("hf model", config, dtype), lambda: HFReference(config, self.weights(case), dtype))
            return hf_generate(hf, prompts, case.new_tokens, **options)
        # The suite's own stop rule (llama_spec.generation), compared with the references' in test_stop_tokens.
        return decoding.greedy(self.adapter(case, engine, dtype), prompts, case.new_tokens, **options)


def _encode(case: Case) -> list[list[int]]:
    """Random ids from the tiny vocabulary, or the texts as Meta's tokenizer and HF's (which must agree) encode
    them, BOS first; or the chat prompts through the real model's own chat template."""
    if case.chat:
        return [real_slice.chat_ids(real_slice.prompt_texts()[name]) for name in case.chat]
    if not case.texts:
        return [make_tokens(support.CONFIG, 1, n, seed=1000 + n + case.start_pos)[0].tolist() for n in case.lengths]

    meta_ids = [meta_tokenizer().encode(t, bos=True, eos=False) for t in case.texts]
    hf_ids = [hf_encode(t, bos=True, eos=False) for t in case.texts]
    assert meta_ids == hf_ids, f"Meta and HF tokenizers disagree on the prompts: {meta_ids} vs {hf_ids}"
    return meta_ids


@pytest.fixture(scope="module")
def engines(request, impl, tiny_weights):
    factory = protocol.load(request.config.getoption("impl") or protocol.BUILTIN)
    return Engines(impl, factory, tiny_weights)


# ---- the two checks -------------------------------------------------------------------------------------------


def first_divergence(actual: list[int], expected: list[int]) -> int:
    """First step at which two token streams differ, -1 when they agree over their common length."""
    return next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), -1)


def _rank(logits: np.ndarray, token: int) -> int:
    """0 for the argmax: how many tokens have a strictly larger logit."""
    return int(np.sum(logits > logits[token]))


def _top(logits: np.ndarray, k: int) -> list[list[float]]:
    """The k most likely [token, log-prob] pairs, most likely first."""
    logprobs = pm.log_softmax(logits)
    order = np.argsort(-logits, kind="stable")[:k]
    return [[int(t), float(logprobs[t])] for t in order]


def assert_generation_parity(request, engines: Engines, case_name: str, *, actual: str, expected: str,
                             dtype: str, reference: str, mesh: str | None):
    """Record and judge one pair of engines on one case, every prompt in one record: the teacher-forced logits
    (`actual` fed `expected`'s tokens) and the free-running streams."""
    __tracebackhide__ = True

    case = CASES[case_name]
    prompts = engines.prompts(case)
    name = f"{case_name}: teacher-forced logits, free-running tokens"
    for engine in {actual, expected} - {"meta", "hf"}:
        _skip_unless_decodable(request, engines, case_name, engine, dtype=dtype, reference=reference, mesh=mesh,
                               name=name)
    want = engines.generate(expected, case, dtype)
    free = engines.generate(actual, case, dtype)
    forced = engines.generate(actual, case, dtype, teacher=want)
    decode = _decoder(case)
    k = int(bounds_for("generation", dtype, request.config.getoption("tolerance_profile"), reference=reference,
                       mesh=mesh)["topk"])
    forced_a, forced_b, rows, parted = [], [], [], []
    for i, (act, exp) in enumerate(zip(free.tokens, want.tokens)):
        forced_a += [forced.step_logits[t][i] for t in range(len(exp))]
        forced_b += [want.step_logits[t][i] for t in range(len(exp))]
        step = first_divergence(act, exp)
        row = {"prompt": i, "prompt_length": len(prompts[i]), "actual_tokens": act, "expected_tokens": exp,
               "first_divergence": step, "topk_actual": None, "topk_expected": None}
        if decode:
            row.update(actual_text=decode(act), expected_text=decode(exp))
        if step >= 0:
            la, lb = free.step_logits[step][i], want.step_logits[step][i]
            a, b = act[step], exp[step]
            gap = max(pm.logprob_gap(la, a, b), pm.logprob_gap(lb, a, b))
            row.update(topk_actual=_top(la, k), topk_expected=_top(lb, k))
            parted.append((i, step, a, b, _rank(lb, a), _rank(la, b), gap))
        rows.append(row)
    metrics = {"first_divergence": float(min((p[1] for p in parted), default=-1)),
               "diverged_prompts": float(len(parted))}
    if parted:
        metrics["logprob_gap"] = max(p[6] for p in parted)
        metrics["divergence_in_topk"] = float(all(max(p[4], p[5]) < k for p in parted))
    extra = {"generation": {"case": case_name, "start_pos": case.start_pos, "actual_engine": engines.label(actual),
                            "expected_engine": engines.label(expected), "rows": rows}}
    try:
        assert_parity(request, component="generation", name=name, actual=np.stack(forced_a),
                      expected=np.stack(forced_b), reference=reference, dtype=dtype, mesh=mesh, logits=True,
                      oracle=_exact_teacher_forced(case, prompts, want, dtype), extra_metrics=metrics, extra=extra)
    except AssertionError as failure:
        a_name, b_name = engines.label(actual), engines.label(expected)
        details = [f"prompt {i} ({len(prompts[i])} tokens): streams part at step {step}: {a_name} chose {a} (rank "
                   f"{rank_a} for {b_name}), {b_name} chose {b} (rank {rank_b} for {a_name}), log-prob gap {gap:.3g}"
                   for i, step, a, b, rank_a, rank_b, gap in parted]
        raise AssertionError("\n  ".join([str(failure), *details])) from None


def _exact_teacher_forced(case: Case, prompts, want: Generation, dtype: str):
    """On the real model, the float64 oracle's logits after each step's history of `want`, in the order of the
    record's rows, so the record's bounds transfer to trained weights (parity.tolerances.noise_scaled); None
    for the synthetic cases, whose bounds were calibrated without it."""
    if not case.chat:
        return None
    steps = []
    for prompt, tokens in zip(prompts, want.tokens):
        sequence = np.asarray([list(prompt) + list(tokens)], np.int32)
        logits = oracle.oracle_forward(real_slice.config(), real_slice.weights(dtype), sequence, 0)[0]
        steps += [logits[len(prompt) - 1 + t] for t in range(len(tokens))]
    return np.stack(steps)


def _skip_unless_decodable(request, engines: Engines, case_name: str, mesh_engine: str, *, dtype: str,
                           reference: str, mesh: str | None, name: str) -> None:
    """Skip when the case's batch does not split over the mesh's data axis; end not checked (recorded) when the
    implementation cannot decode the case (no decode path, or a step without the `pad` / `offset` it needs)."""
    case = CASES[case_name]
    prompts = engines.prompts(case)
    if len(prompts) % parse_mesh(mesh_engine)[0]:
        pytest.skip(f"{len(prompts)} prompts do not split over the data axis of {mesh_engine}")
    reason = decoding.unsupported(engines.adapter(case, mesh_engine, dtype), prompts, case.start_pos)
    if reason:
        record_not_checked(request, component="generation", names=[name], reason=reason, reference=reference,
                           dtype=dtype, mesh=mesh)
        pytest.skip(reason)


def _decoder(case: Case):
    if case.chat:
        return real_slice.decode
    if not case.texts:
        return None

    return meta_tokenizer().decode


# ---- the tests ------------------------------------------------------------------------------------------------


@case_names
def test_model_generates_like_reference(request, engines, case_name, reference, dtype, mesh):
    """The implementation under test on `mesh` against Meta's or HF's own decoding loop."""
    if reference == "oracle":
        pytest.skip("the float64 oracle has no decoding loop; generation parity runs against meta and hf")
    assert_generation_parity(request, engines, case_name, actual=mesh, expected=reference, dtype=dtype,
                             reference=reference, mesh=mesh)


@case_names
def test_mesh_generates_like_single_chip(request, engines, case_name, dtype, mesh):
    """Tensor parallelism changes nothing but summation order: every mesh decodes as 1x1 does."""
    if mesh == "1x1":
        pytest.skip("1x1 is the single-chip baseline the other meshes are compared with")
    assert_generation_parity(request, engines, case_name, actual=mesh, expected="1x1", dtype=dtype,
                             reference="1x1", mesh=mesh)


@case_names
def test_references_generate_alike(request, engines, case_name, dtype):
    """HF's generate against Meta's loop: the two oracles must agree before either can judge the model."""
    if not {"meta", "hf"} <= set(request.config.getoption("reference") or ("meta", "hf")):
        pytest.skip("needs both --reference meta and --reference hf")
    assert_generation_parity(request, engines, case_name, actual="hf", expected="meta", dtype=dtype,
                             reference="meta", mesh=None)


def test_stop_tokens_end_each_row_and_then_the_run(request, impl, tiny_config):
    """A row ends at its first stop token, kept; the other rows decode on; the run ends when every row has ended.
    The tiny vocabulary holds no Llama 3 stop id, so the stops are tokens of the free run itself."""
    adapter = impl("1x1", "float32")
    prompts = [make_tokens(tiny_config, 1, 9, seed=seed)[0].tolist() for seed in (5, 6)]
    reason = decoding.unsupported(adapter, prompts)
    if reason:
        record_not_checked(request, component="generation", names=["stop tokens"], reason=reason, reference=None,
                           dtype="float32", mesh="1x1")
        pytest.skip(reason)
    free = decoding.greedy(adapter, prompts, 12)
    for stops in ({free.tokens[0][3]}, {free.tokens[0][3], free.tokens[1][5]}):
        stopped = decoding.greedy(adapter, prompts, 12, stop_tokens=stops)
        expected = [next((row[:i + 1] for i, t in enumerate(row) if t in stops), row) for row in free.tokens]
        assert stopped.tokens == expected, f"stop tokens {sorted(stops)}: rows {stopped.tokens}, expected {expected}"
        assert len(stopped.step_logits) == max(map(len, expected)), \
            f"stop tokens {sorted(stops)}: {len(stopped.step_logits)} steps run after every row had ended"


@pytest.mark.parametrize("case_name", ["batch", "past_8192"])
def test_builtin_greedy_generate_is_the_suites_decoding_loop(builtin_only, tp_model, engines, case_name):
    """tp_llama.generate.greedy_generate (the CLI's entry point, wiring the model's step into the suite's loop
    llama_spec.generation.greedy) gives the tokens and logits of the suite's loop over the built-in adapter bit
    for bit, free and teacher-forced, so generation parity covers it too."""
    case, model_and_params = CASES[case_name], tp_model("1x4", "float32")
    prompts = engines.prompts(case)
    free = engines.generate("1x4", case, "float32")
    teacher = [[(t + 1) % support.CONFIG.vocab_size for t in row[:case.new_tokens // 2]] for row in free.tokens]
    for fed in (None, teacher):
        ours = greedy_generate(*model_and_params, prompts, case.new_tokens, stop_tokens=meta_stop_tokens(),
                               teacher=fed, start_pos=case.start_pos)
        suites = free if fed is None else engines.generate("1x4", case, "float32", teacher=Generation(fed, []))
        what = f"{case_name}, {'teacher-forced' if fed else 'free'}, 1x4 float32"
        assert ours.tokens == suites.tokens, f"{what}: greedy_generate chose {ours.tokens}, the suite's loop " \
                                             f"{suites.tokens}"
        np.testing.assert_array_equal(np.stack(ours.step_logits), np.stack(suites.step_logits), err_msg=what)


@pytest.mark.real_full  # HF's bf16 generate alone takes about a minute on 2 cores
@pytest.mark.parametrize("real_mesh", real_slice.MESHES)
def test_real_model_generates_like_reference(request, engines, reference, dtype, real_mesh):
    """The real model (32 greedy tokens of chat answers) through the implementation under test on the real
    slice's meshes, against Meta's and HF's own loops."""
    if reference == "oracle":
        pytest.skip("the float64 oracle has no decoding loop; generation parity runs against meta and hf")
    real_slice.skip_unless_text(request, component="generation", names=["real_chat"], dtype=dtype,
                                reference=reference, mesh=real_mesh)
    assert_generation_parity(request, engines, "real_chat", actual=real_mesh, expected=reference, dtype=dtype,
                             reference=reference, mesh=real_mesh)


@pytest.mark.real_full
def test_real_model_generates_alike_on_every_mesh(request, engines, dtype):
    sharded = real_slice.MESHES[-1]
    real_slice.skip_unless_text(request, component="generation", names=["real_chat"], dtype=dtype, reference="1x1",
                                mesh=sharded)
    if sharded == "1x1":
        pytest.skip(f"not checked: no model axis of {real_slice.MODEL_AXES} splits {real_slice.name()}")
    assert_generation_parity(request, engines, "real_chat", actual=sharded, expected="1x1", dtype=dtype,
                             reference="1x1", mesh=sharded)
