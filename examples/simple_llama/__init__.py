"""A tensor-parallel pure-jax.numpy Llama 3.1 (XLA's partitioner, lax.scan, HF RoPE layout) and its adapter, with
every capability of the suite's adapter protocol.

    pytest --impl examples.simple_llama.adapter:SimpleLlamaAdapter
"""
