"""Broken on purpose: splits the kv heads over a model axis wider than n_kv_heads (see examples/broken/__init__.py)."""
from jax.sharding import PartitionSpec as P

from examples.simple_llama.adapter import SimpleLlamaAdapter
from examples.simple_llama.model import CACHE, DATA, Layout


class _OneCopyPerKVHead(Layout):
    """Each kv head stored once: on 1x4 with 2 kv heads, wk and wv are split in quarters, half a head per device.
    The cache cannot split 2 heads 4 ways, so it stays whole on every model device."""

    def kv_copies(self, config) -> int:
        return 1

    def sharding(self, spec):
        return super().sharding(P(None, DATA, None, None, None) if spec == CACHE else spec)


class UnreplicatedKVAdapter(SimpleLlamaAdapter):
    """Right numbers (XLA's partitioner moves what each device lacks), the wrong share of wk and wv per device."""

    @classmethod
    def layout_for(cls, mesh) -> Layout:
        return _OneCopyPerKVHead(mesh, cls.rules)
