"""Broken on purpose: one parameter under a name the sharding check cannot read (see examples/broken/__init__.py)."""
from examples.simple_llama.adapter import SimpleLlamaAdapter


class RenamedParameterAdapter(SimpleLlamaAdapter):
    """parameters() hands the output projection over under HF's name, 'lm_head.weight', not Meta's 'output.weight':
    the sharding check only counts its elements and never checks its placement."""

    def parameters(self):
        params = dict(super().parameters())
        params["lm_head.weight"] = params.pop("output.weight")
        return params
