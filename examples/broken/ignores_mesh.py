"""Broken on purpose: ignores the mesh it is given (see examples/broken/__init__.py)."""
import jax
import numpy as np
from jax.sharding import Mesh

from examples.simple_llama.adapter import SimpleLlamaAdapter
from examples.simple_llama.model import DATA, MODEL, Layout


class IgnoresMeshAdapter(SimpleLlamaAdapter):
    """Every weight and every program on the first device, unsplit, whatever mesh `build` receives."""

    @classmethod
    def layout_for(cls, mesh) -> Layout:
        return Layout(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), (DATA, MODEL)), cls.rules)
