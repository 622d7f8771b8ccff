"""Small NumPy <-> torch helpers shared by the Meta and HF oracles."""
from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(dtype) -> torch.dtype:
    """'float32' | 'bfloat16' (or the torch dtype itself) -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}") from None


def to_torch(x, dtype: torch.dtype) -> torch.Tensor:
    """A NumPy array (any float dtype) -> a torch tensor at `dtype` (float32 first, then torch's own rounding)."""
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True)).to(dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor at any float dtype -> float32 NumPy holding the exact same values (bf16 is a subset)."""
    return t.detach().to(torch.float32).cpu().numpy().copy()


def load_module(module: torch.nn.Module, state: Mapping[str, np.ndarray], dtype: torch.dtype,
                cast: bool = True) -> torch.nn.Module:
    """Load float32 NumPy weights strictly into `module` and switch it to eval. With `cast`, `module.to(dtype)`
    afterwards (parameters and floating buffers); without, the parameters must already be at `dtype` (loading
    rounds the float32 values into them) and buffers keep their dtype."""
    module.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()},
                           strict=True)
    if cast:
        module.to(dtype)
    else:
        wrong = {n: p.dtype for n, p in module.named_parameters() if p.dtype != dtype}
        if wrong:
            raise RuntimeError(f"parameters not at {dtype}: {wrong}")
    return module.eval()


@contextlib.contextmanager
def capture(outputs: Mapping[str, torch.nn.Module], attentions: list, owner, rope_name: str, heads_to_numpy):
    """Record named intermediates of one forward: each module in `outputs` stores its output under its name,
    and the RoPE function `owner.<rope_name>` is wrapped (restored on exit) to store q and k after rotation as
    'layers.{i}.q_rope' / 'k_rope' for the layer whose attention module `attentions[i]` is running."""
    store, current, handles = {}, [None], []

    def save(name):
        def hook(module, args, output):
            store[name] = to_numpy(output)
        return hook

    def enter(i):
        def hook(module, args):
            current[0] = i
        return hook

    def leave(module, args, output):
        current[0] = None

    for name, module in outputs.items():
        handles.append(module.register_forward_hook(save(name)))
    for i, attention in enumerate(attentions):
        handles += [attention.register_forward_pre_hook(enter(i)), attention.register_forward_hook(leave)]

    original = getattr(owner, rope_name)

    def recording_rope(q, k, *args, **kwargs):
        q_out, k_out = original(q, k, *args, **kwargs)
        if current[0] is not None:
            store[f"layers.{current[0]}.q_rope"] = heads_to_numpy(q_out)
            store[f"layers.{current[0]}.k_rope"] = heads_to_numpy(k_out)
        return q_out, k_out

    setattr(owner, rope_name, recording_rope)
    try:
        yield store
    finally:
        setattr(owner, rope_name, original)
        for handle in handles:
            handle.remove()
