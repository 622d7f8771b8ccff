"""EasyDeL 0.3.0's Llama under the conformance suite (its own venv: requirements-easydel.txt, README).

    pytest -n 2 -rs --impl adapters.easydel:EasyDeLLlama      --parity-json out/ed_direct.json
    pytest -n 2 -rs --impl adapters.easydel:EasyDeLLlamaHF    --parity-json out/ed_hf.json
    pytest -n 2 -rs --impl adapters.easydel:EasyDeLLlamaHFHub --parity-json out/ed_hf_hub.json
    pytest -m ecosystem conformance/test_ecosystem_easydel.py

The factories (adapters/easydel/adapter.py: built directly, or by EasyDeL's HF loader from either config.json style;
docs/public-implementations.md#easydel-030-adapterseasydel) are imported on first use (easydel, flax and ray with
them); `checkpoint` needs none of them.
"""

_FACTORIES = ("EasyDeLLlama", "EasyDeLLlamaAdapter", "EasyDeLLlamaHF", "EasyDeLLlamaHFHub", "easydel_mesh")
__all__ = list(_FACTORIES)


def __getattr__(name):
    if name in _FACTORIES:
        from adapters.easydel import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
