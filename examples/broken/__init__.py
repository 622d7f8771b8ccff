"""Deliberately broken implementations, kept as test data: each is examples.simple_llama with one defect, and the
suite must give each the right verdict (conformance/test_communication.py and test_sharding.py check theirs).

- `all_gather:AllGatherAdapter` — wo and w2 column-parallel, so activations are all-gathered where Megatron
  all-reduces (the seed's design): the communication check fails naming the layer and the op.
- `ignores_mesh:IgnoresMeshAdapter` — places and runs everything on one device whatever mesh it is given: the
  sharding check fails (and on a model axis > 1 the communication check finds no sums at all).
- `float32_compute:Float32ComputeAdapter` — asked for bfloat16, computes in float32 and rounds only what it returns
  to bfloat16: every output carries the dtype asked for, so only a check of the error against the float64 oracle
  (far below the Meta reference's own bf16 error) can tell.

Their numerics are otherwise right, so logits and intermediate checks pass: run any of them with
`pytest --impl examples.broken.all_gather:AllGatherAdapter` to see which checks fail.
"""
