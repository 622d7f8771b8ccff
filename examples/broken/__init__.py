"""Deliberately broken implementations, kept as test data: each is examples.simple_llama with one defect, and the
suite must give each the right verdict (conformance/test_communication.py, test_sharding.py and test_dtype.py check
all_gather's, ignores_mesh's and float32_compute's), and so must `llama-conformance doctor` with the fix
(tests/test_doctor.py checks all).

Their numerics are otherwise right, so logits and intermediate checks pass: run any of them with
`pytest --impl examples.broken.all_gather:AllGatherAdapter` to see which checks fail. Each one's defect and the
check that must catch it: docs/internals.md#the-broken-examples.
"""
