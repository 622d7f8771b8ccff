"""dtype honesty: the implementation under test computes in the dtype it was asked for.

Two checks. Its outputs come back in that dtype: every captured intermediate and every floating parameter
(logits may also be float32, as Meta's `.float()` returns them). And, at bfloat16, its error against the
float64 oracle is of the size Meta's own bfloat16 run has: an implementation that quietly keeps float32
weights, or computes in float32 and rounds at the end, is far more exact than bfloat16 can be, and
`noise_floor_ratio` (parity/tolerances.py, measured there) shows it, whatever dtype its outputs claim.
"""
import jax.numpy as jnp
import pytest

from adapters import protocol
from conformance import support
from llama_spec.host import host
from llama_spec.layout import make_mesh
from parity import assert_parity
from parity.check import record_failure
from parity.metrics import compute_metrics
from tp_llama.adapter import TPLlamaAdapter

BATCH, SEQ = 2, 48
FLOATS = ("float16", "bfloat16", "float32", "float64")


def _mismatched_dtypes(adapter, logits, taps, dtype) -> dict[str, str]:
    found = {name: protocol.dtype_of(value) for name, value in taps.items()}
    if protocol.dtype_of(logits) not in (dtype, "float32"):
        found["logits"] = protocol.dtype_of(logits)
    if protocol.missing(adapter, "parameters") is None:
        for name, value in adapter.parameters().items():
            if protocol.dtype_of(value) in FLOATS:
                found[f"parameter {name}"] = protocol.dtype_of(value)
    return {name: got for name, got in found.items() if got != dtype and not (name == "logits" and got == "float32")}


def check_dtype(request, adapter, dtype, mesh):
    scope = dict(component="dtype", reference="meta", dtype=dtype, mesh=mesh)
    tokens = support.tokens(BATCH, SEQ, seed=16)
    logits, taps = support.run(request, protocol.forward, adapter, tokens, **scope,
                               what=f"{type(adapter).__name__}.forward(capture=True)")
    wrong = _mismatched_dtypes(adapter, logits, taps, dtype)
    if wrong:
        listed = ", ".join(f"{name} ({got})" for name, got in list(wrong.items())[:6])
        error = f"asked for {dtype}, {len(wrong)} outputs or parameters came back in another dtype: {listed}"
        record_failure(request, error=error, name="output dtypes", **scope)
        raise AssertionError(f"component 'dtype': {error}\n  reference=meta dtype={dtype} mesh={mesh}")
    if dtype != "bfloat16":
        return
    actual = host(logits)
    (meta_logits, _), (exact_rounded, _) = support.full_forward("meta", dtype, BATCH, SEQ)
    floor = min(compute_metrics(actual, meta_logits, oracle=exact, dtype=dtype)["noise_ratio"]
                for exact in (exact_rounded, support.exact_on_float32_weights(BATCH, SEQ)))
    assert_parity(request, name="logits.noise_floor", actual=actual, expected=meta_logits, oracle=exact_rounded,
                  logits=True, extra_metrics={"noise_floor_ratio": floor}, **scope)


def test_dtype(request, impl, dtype, mesh):
    support.data_split(mesh, BATCH)
    adapter = support.subject(request, impl, mesh, dtype, component="dtype", reference="meta")
    check_dtype(request, adapter, dtype, mesh)


# ---- the check itself catches both ways of not computing in bfloat16 ------------------------------------------

class _Float32Inside:
    """Asked for bf16, runs the built-in model in float32 (on `weights`) and casts what it returns to bf16."""

    def __init__(self, weights, cast_outputs: bool):
        self.inner = TPLlamaAdapter.build(support.CONFIG, weights, make_mesh("1x1"), "float32")
        self.cast = (lambda x: jnp.asarray(x).astype(jnp.bfloat16)) if cast_outputs else (lambda x: x)

    def forward(self, tokens, start_pos=0, capture=False):
        logits, taps = self.inner.forward(tokens, start_pos, capture=True)
        return self.cast(logits), {name: self.cast(value) for name, value in taps.items()}


def test_float32_outputs_when_bfloat16_was_asked_fail(request):
    with pytest.raises(AssertionError, match=r"asked for bfloat16, 16 outputs .* embedding \(float32\)"):
        check_dtype(support.probe(request), _Float32Inside(support.weights("float32"), cast_outputs=False), "bfloat16",
                    "1x1")


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_float32_arithmetic_behind_bfloat16_outputs_fails(request, weights):
    """Outputs cast to bf16, so only the noise floor can tell: float32 weights, or bf16-rounded weights with
    float32 arithmetic."""
    with pytest.raises(AssertionError, match=r"component 'dtype'.*\n.*\n  noise_floor_ratio = "):
        check_dtype(support.probe(request), _Float32Inside(support.weights(weights), cast_outputs=True), "bfloat16",
                    "1x1")


def test_the_broken_float32_adapter_fails(request, tiny_weights):
    """examples/broken's Float32ComputeAdapter (float32 inside, bf16-rounded outputs) fails this check."""
    factory = protocol.load("examples.broken.float32_compute:Float32ComputeAdapter")
    broken = protocol.build(factory, support.CONFIG, tiny_weights, make_mesh("1x1"), "bfloat16")
    with pytest.raises(AssertionError, match=r"component 'dtype'.*asked for bfloat16.*\(float32\)"):
        check_dtype(support.probe(request), broken, "bfloat16", "1x1")
