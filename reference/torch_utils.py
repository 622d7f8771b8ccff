"""Small NumPy <-> torch helpers shared by the Meta and HF oracles."""
from __future__ import annotations

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
