"""An unsharded pure-jax.numpy Llama 3.1 and its adapter: the suite's adapter protocol, end to end.

    pytest conformance/test_impl.py --impl examples.simple_llama.adapter:SimpleLlamaAdapter
"""
