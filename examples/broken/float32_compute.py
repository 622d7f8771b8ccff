"""Broken on purpose: computes in float32 when asked for bfloat16 (see examples/broken/__init__.py)."""
import jax
import jax.numpy as jnp

from examples.simple_llama.adapter import SimpleLlamaAdapter


class Float32ComputeAdapter(SimpleLlamaAdapter):
    """Builds the float32 model whatever dtype is asked for, and rounds every activation it returns (intermediates,
    component outputs) to the asked dtype; logits are float32 either way, as in Meta's reference."""

    @classmethod
    def build(cls, config, weights, mesh, dtype):
        adapter = super().build(config, weights, mesh, "float32")
        adapter.asked = jnp.dtype(dtype)
        return adapter

    def _as_asked(self, tree):
        return jax.tree.map(lambda x: x.astype(self.asked), tree)

    def forward(self, tokens, start_pos=0, capture=False):
        out = super().forward(tokens, start_pos, capture)
        return (out[0], self._as_asked(out[1])) if capture else out

    def rms_norm(self, x, layer, which):
        return self._as_asked(super().rms_norm(x, layer, which))

    def rope(self, q, k, start_pos):
        return self._as_asked(super().rope(q, k, start_pos))

    def attention(self, chunks, layer, start_pos):
        return self._as_asked(super().attention(chunks, layer, start_pos))

    def feed_forward(self, x, layer):
        return self._as_asked(super().feed_forward(x, layer))

    def block(self, x, layer, start_pos):
        return self._as_asked(super().block(x, layer, start_pos))
