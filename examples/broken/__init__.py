"""Deliberately broken implementations, kept as test data: each is examples.simple_llama with one defect, and the
suite must give each the right verdict (conformance/test_communication.py, test_sharding.py and test_dtype.py check
the first three's), and so must `llama-conformance doctor` with the fix (tests/test_doctor.py checks all).

- `all_gather:AllGatherAdapter` — wo and w2 column-parallel, so activations are all-gathered where Megatron
  all-reduces (the seed's design): the communication check fails naming the layer and the op.
- `ignores_mesh:IgnoresMeshAdapter` — places and runs everything on one device whatever mesh it is given: the
  sharding check fails (and on a model axis > 1 the communication check finds no sums at all).
- `float32_compute:Float32ComputeAdapter` — asked for bfloat16, computes in float32 and rounds only what it returns
  to bfloat16: every output carries the dtype asked for, so only a check of the error against the float64 oracle
  (far below the Meta reference's own bf16 error) can tell.
- `half_layout_rope:HalfLayoutRoPEAdapter` — captures q_rope in the model's own rotate-half layout, before its
  conversion to Meta's interleaved pairs: the intermediates check fails on every q_rope.
- `float32_intermediates:Float32IntermediatesAdapter` — asked for bfloat16, computes in it but returns its
  intermediates upcast to float32: the dtype check fails.
- `unreplicated_kv:UnreplicatedKVAdapter` — on a model axis wider than n_kv_heads (1x4 of the tiny config's 2) it
  splits wk and wv as they are, half a kv head per device, instead of replicating each kv head: the sharding check
  fails on their share (and XLA gathers what each device lacks: the communication check fails).
- `renamed_parameter:RenamedParameterAdapter` — `parameters()` names the output projection 'lm_head.weight' (HF's
  name): the sharding check only counts it, so only the doctor, which finds the Meta tensor it holds, fails it.

Their numerics are otherwise right, so logits and intermediate checks pass: run any of them with
`pytest --impl examples.broken.all_gather:AllGatherAdapter` to see which checks fail.
"""
