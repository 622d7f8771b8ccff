"""The real slice: the implementation under test (--impl) built from a real trained model's weights and run on
real chat text (conformance/real_slice.py), on meshes 1x1 and 1x3, against Meta and HF at both dtypes.

Trained weights are another world than seeded ones: the residual stream carries "massive activations" (a few
channels thousands of times the median), norms and attention see them, and near-ties in the logits are real.
Checked here:
- the full forward: logits (KL, top-1, top-k) and every intermediate of all 30 layers;
- the components alone on real activations taken from the float64 oracle's forward at the layers whose input
  holds the largest outliers: RMSNorm, attention, SwiGLU;
- the KV cache: a prefill and one-token decode steps give the full forward's logits;
- mesh invariance: 1x3 gives the 1x1 logits and intermediates.
Greedy generation on the same model is test_generation.py's `real_chat` case. The prompts beyond the default four,
the public-domain text (perplexity, golden check only) and the 2x3 mesh run under the marker `real_full`.
"""
import functools
import json
from pathlib import Path

import numpy as np
import pytest

from adapters import protocol
from conformance import real_slice, support
from fixtures import extremes, real_model
from llama_spec.host import host
from llama_spec.layout import check_splittable, make_mesh
from parity import assert_parity, assert_parity_many
from parity import metrics as pm
from parity.check import record_not_checked
from reference import hf, meta, oracle
from reference.layers import intermediate_names, layer_weights

full = pytest.mark.real_full
CASE_PARAMS = [pytest.param(c, marks=[full] if c in real_slice.FULL_CASES else []) for c in real_slice.CASES]
MESH_PARAMS = [*real_slice.MESHES, *(pytest.param(m, marks=full) for m in real_slice.FULL_MESHES)]
# Checks whose sharded run (1x3) the default run leaves to real_full, to keep the default slice within its minute:
# there 1x3 is covered by mesh invariance (1x3 against 1x1: every block's output and the logits), the golden
# logits and the components.
SINGLE_CHIP_PARAMS = ["1x1", *(pytest.param(m, marks=full) for m in (*real_slice.MESHES[1:], *real_slice.FULL_MESHES))]
REFERENCE_COMPONENTS = {"meta": (meta.meta_rms_norm, meta.meta_attention, meta.meta_feed_forward),
                        "hf": (hf.hf_rms_norm, hf.hf_attention, hf.hf_feed_forward)}
DECODE_PREFILL = 24  # of the first default prompt (37 tokens): the rest are one-token decode steps

def real_subject(request, factory, mesh: str, dtype: str, *, component: str, reference: str | None = None):
    """The --impl factory built from the slice model's weights on `mesh` (once per process); a build that raises is
    a failed record of `component`; a model the slice has no text for ends not checked."""
    __tracebackhide__ = True
    real_slice.skip_unless_text(request, component=component, names=[f"real.{component}"], reference=reference,
                                dtype=dtype, mesh=mesh)
    return support.built_once(
        request, ("real", protocol.name_of(factory), mesh, dtype), lambda: protocol.build(
            factory, real_slice.config(), real_slice.model_weights(), make_mesh(mesh), dtype, max_batch_size=4,
            max_seq_len=1024),
        component=component, reference=reference, dtype=dtype, mesh=mesh,
        what=f"building --impl from the real model ({real_slice.name()}) on {mesh} at {dtype}")


@functools.lru_cache(maxsize=None)
def _forward(adapter, case: str):
    """The subject's (logits, intermediates) on a case, padding dropped; shared by every check of the module (the
    adapter is the process's one build, so it keys the cache)."""
    logits, taps = protocol.forward(adapter, real_slice.tokens(case))
    return (real_slice.valid(case, host(logits)),
            {k: real_slice.valid(case, host(v)) for k, v in taps.items()})


def subject_forward(request, impl_factory, mesh, dtype, case, scope):
    """The subject's forward on a case (built on first use); `scope` names the check for a failed record."""
    __tracebackhide__ = True
    support.data_split(mesh, len(real_slice.CASES[case].prompt_ids))
    adapter = real_subject(request, impl_factory, mesh, dtype, component=scope["component"],
                           reference=scope["reference"])
    return support.run(request, _forward, adapter, case, **scope, what="forward(capture=True) on real text")


@functools.lru_cache(maxsize=2)
def _logits(adapter, case: str):
    """The subject's logits alone (no intermediates: the public-domain text is long), padding dropped."""
    return real_slice.valid(case, host(adapter.forward(real_slice.tokens(case), start_pos=0, capture=False)))


def subject_logits(request, impl_factory, mesh, dtype, case, scope):
    """The subject's logits on a case: from the forward with intermediates where the other checks share it."""
    __tracebackhide__ = True
    if case != real_slice.TEXT_CASE:
        return subject_forward(request, impl_factory, mesh, dtype, case, scope)[0]
    support.data_split(mesh, 1)
    adapter = real_subject(request, impl_factory, mesh, dtype, component=scope["component"],
                           reference=scope["reference"])
    return support.run(request, _logits, adapter, case, **scope, what="forward on the public-domain text")


def _full_model_reference(reference: str) -> None:
    if reference == "oracle":
        pytest.skip("the float64 oracle is consulted for noise_ratio; the real slice compares with meta and hf")


@pytest.mark.parametrize("real_mesh", SINGLE_CHIP_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_real_logits(request, impl_factory, reference, dtype, real_mesh, case):
    mesh = real_mesh
    _full_model_reference(reference)
    scope = dict(component="logits", reference=reference, dtype=dtype, mesh=mesh)
    logits, _ = subject_forward(request, impl_factory, mesh, dtype, case, scope)
    (ref_logits, _), (exact_logits, _) = real_slice.full_forward(reference, dtype, case), real_slice.exact(dtype, case)
    peer_logits, _ = real_slice.full_forward(real_slice.peer(reference), dtype, case)
    assert_parity(request, name=f"real.{case}.logits", actual=logits, expected=ref_logits, oracle=exact_logits,
                  logits=True, peers=[peer_logits], **scope)


@pytest.mark.parametrize("real_mesh", SINGLE_CHIP_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_real_intermediates(request, impl_factory, reference, dtype, real_mesh, case):
    """Every intermediate the subject captures, in forward order; the rest are not checked, by name."""
    mesh = real_mesh
    _full_model_reference(reference)
    scope = dict(component="intermediate", reference=reference, dtype=dtype, mesh=mesh)
    _, taps = subject_forward(request, impl_factory, mesh, dtype, case, scope)
    (_, ref_taps), (_, exact_taps) = real_slice.full_forward(reference, dtype, case), real_slice.exact(dtype, case)
    known = [n for n in intermediate_names(real_slice.config().n_layers) if n != "logits"]
    unknown = sorted(set(taps) - set(known))
    if unknown:
        raise protocol.AdapterError(f"captured names the suite does not know: {unknown}; use reference/layers.py's")
    provided = [n for n in known if n in taps]
    if provided:
        _, peer_taps = real_slice.full_forward(real_slice.peer(reference), dtype, case)
        assert_parity_many(request, actual={n: taps[n] for n in provided},
                           expected={n: ref_taps[n] for n in provided}, oracle=exact_taps, peers=[peer_taps], **scope)
    missing = [n for n in known if n not in taps]
    if missing:
        reason = f"not checked: the subject does not capture {len(missing)} of {len(known)} intermediates"
        record_not_checked(request, names=missing, reason=reason, **scope)
        pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _component_expected(reference: str, dtype: str, layer: int, kind: str):
    """(reference, oracle) outputs of one component on its real input."""
    config, lw = real_slice.config(), layer_weights(real_slice.weights(dtype), layer)
    rms, attention, feed_forward = REFERENCE_COMPONENTS[reference]
    if kind == "rmsnorm":
        x = real_slice.component_input(dtype, layer, "residual")
        return (rms(x, lw["attention_norm"], config.norm_eps, dtype),
                oracle.oracle_rms_norm(x, lw["attention_norm"], config.norm_eps))
    if kind == "attention":
        x = real_slice.component_input(dtype, layer, "attention_norm")
        return attention([x], lw, config, dtype)[0], oracle.oracle_attention([x], lw, config)[0]
    x = real_slice.component_input(dtype, layer, "ffn_norm")
    return (feed_forward(x, lw["w1"], lw["w2"], lw["w3"], dtype),
            oracle.oracle_feed_forward(x, lw["w1"], lw["w2"], lw["w3"]))


COMPONENTS = {"rmsnorm": "rms_norm", "attention": "attention", "mlp": "feed_forward"}


@pytest.mark.parametrize("real_mesh", real_slice.MESHES)
@pytest.mark.parametrize("component", list(COMPONENTS))
def test_real_components_at_the_largest_outliers(request, impl_factory, reference, dtype, real_mesh, component):
    """Each component alone on the real activations of the layers whose input holds the largest outliers."""
    mesh = real_mesh
    _full_model_reference(reference)
    scope = dict(component=component, reference=reference, dtype=dtype, mesh=mesh)
    adapter = real_subject(request, impl_factory, mesh, dtype, component=scope["component"],
                           reference=scope["reference"])
    support.require(request, adapter, COMPONENTS[component], **scope)
    for layer in real_slice.outlier_layers(dtype):
        if component == "rmsnorm":
            x = real_slice.component_input(dtype, layer, "residual")
            actual = support.run(request, adapter.rms_norm, x, layer, "attention_norm", **scope, layer=layer)
        elif component == "attention":
            x = real_slice.component_input(dtype, layer, "attention_norm")
            actual = support.run(request, adapter.attention, [x], layer, 0, **scope, layer=layer)[0]
        else:
            x = real_slice.component_input(dtype, layer, "ffn_norm")
            actual = support.run(request, adapter.feed_forward, x, layer, **scope, layer=layer)
        expected, exact = _component_expected(reference, dtype, layer, component)
        peer, _ = _component_expected(real_slice.peer(reference), dtype, layer, component)
        assert_parity(request, name=f"real.layers.{layer}.{component}", layer=layer, actual=host(actual),
                      expected=expected, oracle=exact, peers=[peer], **scope)


@pytest.mark.parametrize("real_mesh", SINGLE_CHIP_PARAMS)
def test_real_decode_equals_full_forward(request, impl_factory, dtype, real_mesh):
    """The first default prompt: a prefill, then one-token steps, against the subject's own full forward."""
    mesh = real_mesh
    scope = dict(component="kv_cache", reference="self", dtype=dtype, mesh=mesh)
    support.data_split(mesh, 1)
    adapter = real_subject(request, impl_factory, mesh, dtype, component=scope["component"],
                           reference=scope["reference"])
    tokens = np.asarray([real_slice.prompts("chat")[0]], np.int32)
    prefill = min(DECODE_PREFILL, tokens.shape[1] - 4)  # a prompt shorter than the pinned model's still steps
    support.require(request, adapter, "decode", **scope, names=["real.decode"])
    full_logits = host(support.run(request, adapter.forward, tokens, **scope))
    cache = support.run(request, adapter.init_cache, 1, tokens.shape[1], **scope)
    logits, cache = support.run(request, adapter.step, tokens[:, :prefill], 0, cache, **scope)
    stepped = [host(logits)]
    for slot in range(prefill, tokens.shape[1]):
        logits, cache = support.run(request, adapter.step, tokens[:, slot:slot + 1], slot, cache, **scope)
        stepped.append(host(logits))
    exact_logits = real_slice.exact(dtype, "chat")[0][None, :tokens.shape[1]]  # the first prompt's positions
    assert_parity(request, name=f"real.decode: prefill {prefill} then steps", logits=True,
                  actual=np.concatenate(stepped, axis=1), expected=full_logits, oracle=exact_logits, **scope)


@pytest.mark.parametrize("real_mesh", [m for m in MESH_PARAMS if m != "1x1"])
def test_real_mesh_invariance(request, impl_factory, dtype, real_mesh):
    """The default case on a sharded mesh against the same subject on one device."""
    mesh = real_mesh
    scope = dict(component="tp_invariance", reference="1x1", dtype=dtype, mesh=mesh)
    base_logits, base_taps = subject_forward(request, impl_factory, "1x1", dtype, "chat", scope)
    logits, taps = subject_forward(request, impl_factory, mesh, dtype, "chat", scope)
    exact_logits, exact_taps = real_slice.exact(dtype, "chat")
    assert_parity(request, name="real.chat.logits", actual=logits, expected=base_logits, oracle=exact_logits,
                  logits=True, **scope)
    shared = {n: taps[n] for n in base_taps if n in taps and n.endswith(("block_out", "final_norm"))}
    if shared:
        assert_parity_many(request, actual=shared, expected={n: base_taps[n] for n in shared}, oracle=exact_taps,
                           **scope)


def _kl_per_position(expected_lp: np.ndarray, actual_lp: np.ndarray) -> np.ndarray:
    """KL(expected || actual) per position over the golden's top-20 ids and one bin for the rest of the mass."""
    def binned(lp):
        p = np.exp(np.asarray(lp, np.float64))
        return np.concatenate([p, np.clip(1.0 - p.sum(-1, keepdims=True), 1e-12, None)], axis=-1)
    p, q = binned(expected_lp), binned(actual_lp)
    return np.sum(p * (np.log(np.clip(p, 1e-300, None)) - np.log(np.clip(q, 1e-300, None))), axis=-1)


@pytest.mark.parametrize("real_mesh", MESH_PARAMS)
@pytest.mark.parametrize("case", [*CASE_PARAMS, pytest.param(real_slice.TEXT_CASE, marks=full)])  # 2,045 tokens
def test_real_logits_match_the_golden_data(request, impl_factory, dtype, real_mesh, case):
    """The subject's log-probs at the golden top-20 ids against HF's kept ones (the float64 oracle's kept too, for
    noise_ratio), no reference run; the task-level figures (perplexity on the prompts or on the public-domain
    text, the per-position KL distribution and the share of the same top-1) go into the record's metrics."""
    mesh = real_mesh
    scope = dict(component="golden", reference="hf", dtype=dtype, mesh=mesh)
    if not real_slice.has_golden_data():
        reason = (f"not checked: the golden data ({real_slice.GOLDEN_FILE.name}) holds {real_model.NAME}'s "
                  f"log-probs, not {real_slice.name()}'s; the other real-slice checks run its references")
        record_not_checked(request, names=[f"real.{case}.golden_top{real_slice.GOLDEN_TOPK}"], reason=reason, **scope)
        pytest.skip(reason)
    logits = subject_logits(request, impl_factory, mesh, dtype, case, scope)
    kept = real_slice.golden()[case]
    logprobs = pm.log_softmax(logits)
    actual = np.take_along_axis(logprobs, kept["ids"].astype(np.int64), -1)
    kl = _kl_per_position(kept[f"hf_{dtype}"], actual)
    nll = real_slice.next_token_nll(case, logprobs)
    figures = {"perplexity": float(np.exp(nll.mean())),
               "perplexity_hf": float(np.exp(kept[f"hf_nll_{dtype}"].mean())),
               "perplexity_oracle": float(np.exp(kept[f"oracle_nll_{dtype}"].mean())),
               "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
               "kl_p99": float(np.quantile(kl, 0.99)), "kl_p999": float(np.quantile(kl, 0.999)),
               "same_top1": float(np.mean(np.argmax(logits, -1) == kept["ids"][:, 0]))}
    assert_parity(request, name=f"real.{case}.golden_top{real_slice.GOLDEN_TOPK}", actual=actual,
                  expected=kept[f"hf_{dtype}"], oracle=kept[f"oracle_{dtype}"], extra_metrics=figures, **scope)


def test_real_model_reaches_massive_activations():
    """The real slice is only worth its time if the model is the real one: its residual stream must carry the
    outliers trained Llama-architecture models are known for (max/median above 1000 somewhere), and the synthetic
    extremes must reach them."""
    if not real_slice.has_golden_data():
        pytest.skip(f"not checked: measures {real_model.NAME}'s outliers against the synthetic extremes, and "
                    f"--checkpoint-dir makes {real_slice.name()} the slice's model")
    ratios = [extremes.outlier_ratio(x) for x in real_slice.residual_inputs("float32")]
    assert max(ratios) > 1000, f"largest max/median of the residual stream is {max(ratios):.3g}: not the real model"
    assert max(ratios) <= extremes.MIN_OUTLIER_RATIO, (
        f"the real model's residual stream reaches max/median {max(ratios):.3g}, beyond what the synthetic extremes "
        f"are held to ({extremes.MIN_OUTLIER_RATIO:.3g}): raise fixtures/extremes.py's OUTLIER_FACTOR and "
        "MIN_OUTLIER_RATIO to the real magnitude")


# ---- the real model's own files: pinned, converted once, every bad input one line --------------------------


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    return message


def test_the_installed_gguf_is_the_pinned_file():
    real_model.verify_gguf(real_model.gguf_path())


@pytest.mark.parametrize("fault", ["missing", "truncated", "substituted"])
def test_a_bad_gguf_stops_with_one_line_naming_it(tmp_path, fault):
    good = b"GGUF" + bytes(range(256)) * 4
    path = tmp_path / "model.gguf"
    if fault != "missing":
        path.write_bytes(good[:-7] if fault == "truncated" else good[::-1])
    with pytest.raises(real_model.RealModelError) as error:
        real_model.verify_gguf(path, size=len(good), sha256=real_model.hashlib.sha256(good).hexdigest())
    message = _one_line(error)
    assert str(path) in message and {"missing": "missing", "truncated": "bytes, expected",
                                     "substituted": "sha256"}[fault] in message, message


@pytest.mark.parametrize("file", ["hf/config.json", "meta/params.json"])
def test_a_cached_config_that_disagrees_with_the_gguf_metadata_stops(tmp_path, file):
    """The cache's configs are checked against the GGUF metadata the manifest pinned; a disagreement names the
    file and the field, and says how to convert again."""
    real = real_model.checkpoint()
    target = tmp_path / "cache"
    for sub, name in (("hf", "config.json"), ("meta", "params.json")):
        (target / sub).mkdir(parents=True)
        source = (real.hf_dir if sub == "hf" else real.meta_dir) / name
        (target / sub / name).write_text(source.read_text())
    (target / real_model.MANIFEST).write_text((real.hf_dir.parent / real_model.MANIFEST).read_text())
    assert real_model._cached(target).config == real.config  # the copy as written passes
    edited = json.loads((target / file).read_text())
    key = "num_key_value_heads" if file.endswith("config.json") else "n_kv_heads"
    edited[key] = 9
    (target / file).write_text(json.dumps(edited))
    with pytest.raises(real_model.RealModelError) as error:
        real_model._cached(target)
    message = _one_line(error)
    assert str(target / file) in message and "n_kv_heads" in message and "convert again" in message, message


@pytest.fixture
def fake_conversion(monkeypatch):
    """convert() with transformers' loading and the checkpoint writers replaced by stand-ins that write a marker
    file each: what convert does with the directories is under test, not the conversion itself."""
    class Model:
        config = type("Config", (), {"to_dict": staticmethod(lambda: real_model.checkpoint().config.to_hf())})
        generation_config = type("Generation", (), {"to_json_file": staticmethod(
            lambda path: Path(path).write_text("{}"))})

        @staticmethod
        def state_dict():
            return {}

    class Tokenizer:
        @staticmethod
        def save_pretrained(directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    def written(directory, *args, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"new")
        return Path(directory)

    monkeypatch.setattr(real_model, "_load_gguf", lambda path: (Model(), Tokenizer()))
    monkeypatch.setattr(real_model, "metadata_config", lambda path: real_model.checkpoint().config)
    monkeypatch.setattr(real_model, "meta_weights_of", lambda state, config: {})
    monkeypatch.setattr(real_model, "write_hf_checkpoint", written)
    monkeypatch.setattr(real_model, "write_meta_checkpoint", written)
    return monkeypatch


def test_a_failed_conversion_leaves_nothing_half_written(tmp_path, fake_conversion):
    """A write that fails after the first checkpoint is on disk: one line, no target, no staging left."""
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    fake_conversion.setattr(real_model, "write_meta_checkpoint", disk_full)
    target = tmp_path / "cache" / "entry"
    with pytest.raises(real_model.RealModelError) as error:
        real_model.convert(tmp_path / "model.gguf", target)
    assert "No space left" in _one_line(error) and "nothing was kept" in str(error.value)
    assert not target.exists() and list(target.parent.iterdir()) == [], list(target.parent.iterdir())


def test_a_conversion_that_finds_another_processs_result_keeps_it(tmp_path, fake_conversion):
    """Two workers converting at once: the later one's rename meets the earlier one's finished directory, keeps
    it and leaves no staging behind."""
    target = tmp_path / "entry"
    (target / "hf").mkdir(parents=True)
    (target / "hf" / "model.safetensors").write_bytes(b"first")
    (target / real_model.MANIFEST).write_text("{}")
    real_model.convert(tmp_path / "model.gguf", target)
    assert (target / "hf" / "model.safetensors").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"], list(tmp_path.iterdir())


def test_a_model_axis_of_nine_is_refused_in_one_line():
    """9 query heads would split over 9 devices, but neither the 3 kv heads' replication rule nor the vocab
    (49152 = 2^14 x 3) would: the suite's layout check says which, in one line."""
    with pytest.raises(ValueError) as error:
        check_splittable(real_slice.config(), 9, where=real_model.NAME)
    message = _one_line(error)
    assert "vocab_size=49152" in message and real_model.NAME in message, message

