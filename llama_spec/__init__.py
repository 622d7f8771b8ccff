"""Llama 3.1 as the suite's parts agree on it, owned by no implementation: the config (params.json / config.json),
the checkpoint formats and their loader, Meta's tensor table and the mesh arithmetic of the sharding contract,
and what a greedy generation returns. The built-in model, the references, the fixtures and the checks import
this; it imports none of them."""
