"""keras-hub's Llama 3 under the conformance suite (`pip install -r requirements-ecosystem.txt`, its own venv).

    pytest -n 2 -rs --impl adapters.keras_hub:KerasHubLlama      --parity-json out/kh_direct.json
    pytest -n 2 -rs --impl adapters.keras_hub:KerasHubLlamaHF    --parity-json out/kh_hf.json
    pytest -n 2 -rs --impl adapters.keras_hub:KerasHubLlamaHFHub --parity-json out/kh_hf_hub.json
    pytest -m ecosystem conformance/test_ecosystem.py

The factories (adapters/keras_hub/adapter.py: built directly, or by keras-hub's HF converter from either config.json
style; docs/public-implementations.md#keras-hub-0320-adapterskeras_hub) are imported on first use, keras with them;
the first sets KERAS_BACKEND=jax when it is unset (keras reads it at import). `checkpoint` and `table` need neither.
"""
import os

_FACTORIES = ("KerasHubLlama", "KerasHubLlamaAdapter", "KerasHubLlamaHF", "KerasHubLlamaHFHub", "keras_distribution")
__all__ = list(_FACTORIES)


def __getattr__(name):
    if name in _FACTORIES:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        from adapters.keras_hub import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
