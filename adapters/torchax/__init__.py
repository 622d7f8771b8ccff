"""HF transformers' PyTorch Llama run as JAX through torchax 0.0.13 under the conformance suite (its own venv:
`pip install -r requirements.txt -r requirements-torchax.txt`).

    pytest -n 2 --impl adapters.torchax:TorchaxLlama      --mesh 1x4 --parity-json out/torchax_TorchaxLlama.json
    pytest -n 2 --impl adapters.torchax:TorchaxLlamaHF    --mesh 1x4 --parity-json out/torchax_TorchaxLlamaHF.json
    pytest -n 2 --impl adapters.torchax:TorchaxLlamaHFHub --mesh 1x4 --parity-json out/torchax_TorchaxLlamaHFHub.json
    pytest -m ecosystem conformance/test_ecosystem_torchax.py

Factories (adapters/torchax/adapter.py): `TorchaxLlama` (LlamaForCausalLM from the suite's config and weights),
`TorchaxLlamaHF` / `TorchaxLlamaHFHub` (from_pretrained on the suite's HF checkpoint, config.json in transformers 5's
`rope_parameters` style / the hub's `rope_scaling` style); each has `build_from_checkpoint(DIR, mesh, dtype, 'hf')`.
The factories are imported on first use (torch, transformers and torchax with them).
"""
_FACTORIES = ("TorchaxLlama", "TorchaxLlamaAdapter", "TorchaxLlamaHF", "TorchaxLlamaHFHub")
__all__ = list(_FACTORIES)


def __getattr__(name):
    if name in _FACTORIES:
        from adapters.torchax import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
