"""penzai 0.2.5's Llama under the conformance suite (its own venv: `pip install -r requirements.txt
-r requirements-torchax.txt`, which holds penzai's pins beside torchax's).

    pytest -n 2 --impl adapters.penzai:PenzaiLlama --mesh 1x4 --parity-json out/penzai_PenzaiLlama.json
    pytest -n 2 --impl adapters.penzai:PenzaiLlamaUnchecked --mesh 1x4 \
        --parity-json out/penzai_PenzaiLlamaUnchecked.json
    pytest -m ecosystem conformance/test_ecosystem_penzai.py

Factories (adapters/penzai/adapter.py): `PenzaiLlama` (penzai's documented `llama_from_huggingface_model`, which
refuses every Llama 3 model under transformers 5) and `PenzaiLlamaUnchecked` (its unchecked llama-like converter).
Imported on first use (torch, transformers and penzai with them).
"""
_FACTORIES = ("PenzaiLlama", "PenzaiLlamaAdapter", "PenzaiLlamaUnchecked")
__all__ = list(_FACTORIES)


def __getattr__(name):
    if name in _FACTORIES:
        from adapters.penzai import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
