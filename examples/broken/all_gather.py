"""Broken on purpose: gathers activations instead of all-reducing (see examples/broken/__init__.py)."""
from jax.sharding import PartitionSpec as P

from examples.simple_llama.adapter import SimpleLlamaAdapter
from examples.simple_llama.model import MODEL, RULES


class AllGatherAdapter(SimpleLlamaAdapter):
    """wo and w2 split on their output features (column-parallel) like every other projection: each needs the
    whole of its heads-split / feature-split input, and its split output must be gathered back into the residual
    stream, so XLA all-gathers twice per layer where Megatron sums once."""

    rules = {**RULES, "wo": P(None, None, MODEL), "w2": P(None, None, MODEL)}
