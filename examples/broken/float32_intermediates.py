"""Broken on purpose: float32 intermediates in a bfloat16 run (see examples/broken/__init__.py)."""
import jax
import jax.numpy as jnp

from examples.simple_llama.adapter import SimpleLlamaAdapter


class Float32IntermediatesAdapter(SimpleLlamaAdapter):
    """Computes in the dtype asked for, but upcasts every captured intermediate to float32 before returning it."""

    def forward(self, tokens, start_pos=0, capture=False):
        out = super().forward(tokens, start_pos, capture)
        if not capture:
            return out
        logits, taps = out
        return logits, jax.tree.map(lambda x: x.astype(jnp.float32), taps)
