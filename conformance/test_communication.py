"""The implementation's compiled forward communicates exactly as Megatron tensor parallelism should.

The adapter hands over the program its forward runs (`compiled_forward`, adapters/protocol.py); parity.communication
reads that program's optimised HLO and lists every collective by kind, count, bytes and the op feeding it
(collectives inside a scan over layers count once per trip). On a model axis M > 1 it expects one all-reduce for the
vocab-parallel embedding, one after each layer's wo and one after each layer's w2, each of (batch/D) x seq x dim
elements over the M devices of the model axis, and no all-gather, all-to-all, reduce-scatter or permute (weights
are never gathered, logits stay sharded on vocab: an all-gather of the output logits alone is reported as the
caller's gather). On 1x1 nothing may be communicated. A design that gathers every layer's output (the seed's)
fails here naming the layer and the op, and so does one that forgets an all-reduce or adds one. Every run records
the bytes communicated per token against the Megatron minimum, for any layout.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from adapters import protocol
from conformance import support
from llama_spec.layout import make_mesh
from llama_spec.synthetic import make_tokens
from parity import communication
from parity.check import NOT_CHECKED_KEY, RECORD_KEY, record_not_checked

MESHES = ("1x1", *support.meshes_of_model(("1x4", "2x4")))
BATCH, SEQ = 2, 8
BROKEN = "examples.broken"


def check_communication(request, adapter, config, dtype, mesh, batch=BATCH, seq=SEQ):
    """The Megatron claim on the adapter's own compiled forward; not checked without the capability."""
    __tracebackhide__ = True
    reason = protocol.missing(adapter, "compiled_forward")
    if reason:
        record_not_checked(request, component="communication", names=["compiled_forward"], reason=reason,
                           reference=None, dtype=dtype, mesh=mesh)
        pytest.skip(reason)
    return communication.assert_megatron(request, adapter.compiled_forward(batch, seq), config=config, mesh=mesh,
                                         dtype=dtype, batch=batch, seq=seq)


@pytest.mark.parametrize("mesh_text", MESHES)
def test_compiled_forward_communicates_as_megatron(request, impl, tiny_config, dtype, mesh_text):
    record = check_communication(request, impl(mesh_text, dtype), tiny_config, dtype, mesh_text)
    assert record["communication"]["collectives"] or mesh_text == "1x1"


def test_logits_stay_sharded_on_vocab(tp_model, tiny_config):
    """The built-in model's forward returns its logits still split on vocab (the caller gathers)."""
    model, params = tp_model("1x4", "float32")
    logits = model.forward(params, make_tokens(model.config, 2, 8))
    assert tuple(logits.sharding.spec) == (None, None, "model")
    assert {s.data.shape for s in logits.addressable_shards} == {(2, 8, tiny_config.vocab_size // 4)}


# ---- the check itself: planted layouts, and the HLO forms it must read ----------------------------



def _broken(name, tiny_config, tiny_weights, mesh, dtype="bfloat16"):
    return protocol.build(protocol.load(f"{BROKEN}.{name}"), tiny_config, tiny_weights, make_mesh(mesh), dtype)


def test_gathering_instead_of_all_reducing_fails_naming_layer_and_op(request, tiny_config, tiny_weights):
    probe = support.probe(request)
    adapter = _broken("all_gather:AllGatherAdapter", tiny_config, tiny_weights, "1x4")
    with pytest.raises(AssertionError) as failure:
        check_communication(probe, adapter, tiny_config, "bfloat16", "1x4")
    message = str(failure.value)
    assert "mesh 1x4 (bfloat16, batch 2 x seq 8) contradicts the Megatron layout" in message
    assert "every layer (one iteration of %while" in message and "all-gather %" in message
    assert "fed by fusion 'while/body/closed_call/attention/wo/" in message  # the op feeding the gather
    assert "-> f32[2,8,128] (8192 B, x2) over 4 devices" in message  # kind, bytes, executions
    assert "Megatron moves no all-gather" in message
    assert "0 all-reduce sums (none); expected 2 (after wo and after w2)" in message
    [record] = [v for k, v in probe.node.user_properties if k == RECORD_KEY]
    assert not record["passed"] and record["communication"]["kinds"]["all-gather"]["count"] == 8
    assert record["metrics"]["ratio_to_megatron"] == 6.5


def test_ignoring_the_mesh_fails_with_no_sums(request, tiny_config, tiny_weights):
    adapter = _broken("ignores_mesh:IgnoresMeshAdapter", tiny_config, tiny_weights, "1x4")
    with pytest.raises(AssertionError, match=r"0 all-reduce sums in all \(none\).* expected 5"):
        check_communication(support.probe(request), adapter, tiny_config, "bfloat16", "1x4")


def test_the_callers_gather_of_the_logits_is_reported_not_failed(request, tiny_config, tiny_weights):
    """The example model with its logits gathered at the end of the program: allowed, and its bytes counted."""
    class GathersLogits:
        def __init__(self, inner):
            self.inner = inner

        def forward(self, tokens, start_pos=0, capture=False):
            return self.inner.forward(tokens, start_pos, capture)

        def compiled_forward(self, batch, seq):
            inner = self.inner
            gathered = jax.jit(inner._logits, out_shardings=inner.layout.sharding(P()))
            spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
            return gathered.lower(inner.params, spec, spec, jax.ShapeDtypeStruct((batch,), jnp.int32))

    inner = protocol.build(protocol.load("examples.simple_llama.adapter:SimpleLlamaAdapter"), tiny_config,
                           tiny_weights, make_mesh("1x4"), "bfloat16")
    record = check_communication(support.probe(request), GathersLogits(inner), tiny_config, "bfloat16", "1x4")
    digest = record["communication"]
    assert len(digest["caller_gathers"]) == 1 and digest["kinds"]["all-gather"]["count"] == 1
    logits_per_token = tiny_config.vocab_size * 4  # float32 logits, gathered once
    assert digest["bytes_per_token"] == 5 * tiny_config.dim * 4 + logits_per_token


def test_a_missing_capability_is_not_checked(request, tiny_config):
    class ForwardOnly:
        def forward(self, tokens, start_pos=0, capture=False):
            return tokens

    probe = support.probe(request)
    with pytest.raises(pytest.skip.Exception, match="not checked: ForwardOnly has no compiled_forward"):
        check_communication(probe, ForwardOnly(), tiny_config, "float32", "1x4")
    assert [v["name"] for k, v in probe.node.user_properties if k == NOT_CHECKED_KEY] == ["compiled_forward"]


def test_scanned_tuple_all_reduce_and_gather_are_counted_per_trip():
    """A real program: lax.scan of 3 trips, each with one psum of two arrays and one all_gather, on 2x4."""
    mesh = make_mesh("2x4")

    def local(ws, x):
        def body(h, w):
            y = jnp.dot(h, w)
            a, b = jax.lax.psum((y, 2 * y), "model")
            g = jax.lax.all_gather(a, "model", axis=1, tiled=True)
            return h + (a + b + g[:, :16])[:, :4], None

        return jax.lax.scan(body, x, ws)[0]

    program = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "model", None), P("data", "model")),
                                    out_specs=P("data", "model")))
    found = communication.collectives(program.lower(jnp.ones((3, 16, 16)), jnp.ones((4, 16))).compile().as_text())
    assert sorted(c.kind for c in found) == ["all-gather", "all-reduce"]
    reduce, = [c for c in found if c.kind == "all-reduce"]
    gather, = [c for c in found if c.kind == "all-gather"]
    assert reduce.operands == (("f32", (2, 16)), ("f32", (2, 16))) and reduce.bytes == 2 * 2 * 16 * 4
    assert reduce.executions == gather.executions == 3 and reduce.trip_count_known and reduce.group_size == 4
    assert reduce.where() == gather.where() == f"every iteration of {reduce.loop}" and "(3 trips)" in reduce.loop
    assert gather.bytes == 2 * 64 * 4  # the gathered result
    assert reduce.feeder_op_name.endswith("dot_general")


ASYNC_LOOP = """HloModule synthetic, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (state: (s32[], f32[2,8,128])) -> pred[] {
  %state = (s32[], f32[2,8,128]) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %n = s32[] constant(LIMIT)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (state.1: (s32[], f32[2,8,128])) -> (s32[], f32[2,8,128]) {
  %state.1 = (s32[], f32[2,8,128]) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %h = f32[2,8,128]{2,1,0} get-tuple-element(%state.1), index=1
  %dot = f32[2,8,128]{2,1,0} multiply(%h, %h), metadata={op_name="jit(f)/while/body/layers.1/w2/dot_general"}
  %copy = f32[2,8,128]{2,1,0} copy(%dot)
  %start = f32[2,8,128]{2,1,0} all-reduce-start(%copy), replica_groups=[1,4]<=[4], to_apply=%add, metadata={op_name="jit(f)/while/body/psum"}
  %done = f32[2,8,128]{2,1,0} all-reduce-done(%start)
  %one = s32[] constant(1)
  %next = s32[] add(%i.1, %one)
  ROOT %out = (s32[], f32[2,8,128]) tuple(%next, %done)
}

ENTRY %main (x: f32[2,8,128]) -> f32[2,8,128] {
  %x = f32[2,8,128]{2,1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[2,8,128]) tuple(%zero, %x)
  %loop = (s32[], f32[2,8,128]) while(%init), condition=%cond, body=%body
  ROOT %result = f32[2,8,128]{2,1,0} get-tuple-element(%loop), index=1
}
"""  # noqa: E501 - HLO text as XLA prints it


def test_async_pairs_count_once_and_the_loop_condition_gives_the_trips():
    """No backend_config trip count: `i < 5` from 0 runs 5 times; the -start/-done pair is one all-reduce."""
    [found] = communication.collectives(ASYNC_LOOP.replace("LIMIT", "5"))
    assert (found.kind, found.executions, found.trip_count_known, found.group_size) == ("all-reduce", 5, True, 4)
    assert found.bytes == 2 * 8 * 128 * 4 and found.layer == 1  # layer from the feeding op's 'layers.1'
    assert (found.feeder, found.feeder_op_name) == ("multiply", "jit(f)/while/body/layers.1/w2/dot_general")


def test_a_loop_of_unknown_trip_count_is_a_problem_not_a_guess():
    unknown = ASYNC_LOOP.replace("%n = s32[] constant(LIMIT)", "%n = s32[] get-tuple-element(%state), index=0")
    [found] = communication.collectives(unknown)
    assert not found.trip_count_known
    expect = communication.Expectation(2, 128, 512, 1, 4, 2, 8, "float32")
    assert any("unknown trip count" in p for p in communication.megatron_problems([found], expect))


def test_a_collective_on_a_single_device_mesh_fails():
    [found] = communication.collectives(ASYNC_LOOP.replace("LIMIT", "2"))
    expect = communication.Expectation(2, 128, 512, 1, 1, 2, 8, "float32")
    problems = communication.megatron_problems([found], expect)
    assert problems == [f"layer 1: {found.describe()}; expected no collective on a mesh without a model axis"]


def test_replica_group_forms():
    def size(groups, partitions=8):
        line = f"  %r = f32[4]{{0}} all-reduce(%x), replica_groups={groups}, to_apply=%add"
        return communication.group_size(communication._instruction(line), partitions)

    assert size("{{0,1,2,3},{4,5,6,7}}") == 4
    assert size("[2,4]<=[8]") == 4 and size("[4,2]<=[2,4]T(1,0)") == 2
    assert size("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}") == 4
    assert size("{}") == 8
    assert size("mesh['a'=2,'b'=4] {'a','b'}") == 8
