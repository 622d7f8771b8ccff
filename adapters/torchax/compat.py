"""Importing torchax 0.0.13 under the suite's torch 2.13.0.

torchax 0.0.13 names, at import time, aten overloads with named dimensions (Dimname) that torch 2.13 no longer has
(torchax/amp.py:118 `torch.ops.aten.prod.dim_Dimname`, and the entries below in amp.py and decompositions.py), so a
plain `import torchax` raises AttributeError (docs/findings/torchax-torch-2-13-import.md). torchax only uses them as
keys of its AMP cast-policy table and as entries of decomposition lists; `torch._decomp.get_decompositions` skips
what is not an operator. So each missing overload is set to an inert placeholder string on its packet before the
import: no operator the Llama forward runs is touched, and an overload that exists is left alone.
"""
from __future__ import annotations

import importlib

# (op, overload) named by torchax 0.0.13 (amp.py, decompositions.py) that torch 2.13.0 lacks.
ABSENT_IN_TORCH_2_13 = (
    ("prod", "dim_Dimname"), ("index_copy", "dimname"), ("all", "dimname"), ("all", "dimname_out"),
    ("index_add", "dimname"), ("index_copy_", "dimname"), ("index_fill", "Dimname_Scalar"),
    ("index_fill", "Dimname_Tensor"), ("index_fill_", "Dimname_Scalar"), ("index_fill_", "Dimname_Tensor"),
    ("norm", "names_ScalarOpt_dim"), ("norm", "names_ScalarOpt_dim_dtype"), ("norm", "names_dtype_out"),
    ("norm", "names_out"), ("std", "names_dim"), ("std", "names_out"), ("std", "correction_names"),
    ("std", "correction_names_out"), ("std_mean", "names_dim"), ("std_mean", "correction_names"),
    ("unbind", "Dimname"),
)


def absent_overloads() -> list[str]:
    """The overloads of ABSENT_IN_TORCH_2_13 this torch lacks, as 'aten.op.overload'."""
    import torch

    return [f"aten.{op}.{overload}" for op, overload in ABSENT_IN_TORCH_2_13
            if overload not in getattr(torch.ops.aten, op).overloads()]


def import_torchax():
    """torchax, imported after the absent overloads got their placeholders (see the module doc)."""
    import torch

    for name in absent_overloads():
        _, op, overload = name.split(".")
        setattr(getattr(torch.ops.aten, op), overload, f"<{name}: absent in torch {torch.__version__}>")
    return importlib.import_module("torchax")
