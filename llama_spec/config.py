"""Llama 3.1 hyper-parameters, read from Meta's params.json or HF's config.json.

Field names follow Meta's params.json so a checkpoint's file maps onto this class one to one.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

# Llama 3.1 RoPE frequency scaling (Meta's apply_scaling), under HF's config.json names.
LLAMA31_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}

# Meta's params.json fields. Those without a default must be present in a params.json.
_REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = True
    max_seq_len: int = 131072

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "n_kv_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width by Meta's rule (FeedForward in llama_models/llama3/model.py)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---- Meta params.json -------------------------------------------------------------------

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str = "params.json") -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; expected only {sorted(known)}")
        missing = [name for name in _REQUIRED if name not in params]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        # Meta's checkpoints predate scaled RoPE; its own ModelArgs defaults it to off.
        values = {"use_scaled_rope": False, **params}
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_params_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file; a Meta checkpoint directory needs params.json") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_params(params, source=str(path))

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- Hugging Face config.json -----------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        try:
            dim, n_heads, hidden = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
            scaled = rope.get("rope_type", rope.get("type")) == "llama3"
            config = cls(
                dim=dim,
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads", n_heads),
                vocab_size=hf["vocab_size"],
                norm_eps=hf.get("rms_norm_eps", 1e-5),
                rope_theta=float(theta),
                use_scaled_rope=scaled,
                max_seq_len=hf.get("max_position_embeddings", 131072),
                # HF stores the SwiGLU width directly; multiple_of=hidden reproduces it exactly.
                multiple_of=hidden,
                ffn_dim_multiplier=None,
            )
        except KeyError as err:
            raise ValueError(f"{source}: missing field {err.args[0]!r}") from None
        if config.hidden_dim != hidden:
            raise ValueError(f"{source}: intermediate_size={hidden} cannot be expressed by Meta's SwiGLU rule")
        return config

    def to_hf(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.use_scaled_rope:
            rope.update(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "rope_parameters": rope,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
        }


PRESETS: dict[str, LlamaConfig] = {
    # Exactly Meta's Llama 3.1 8B params.json (hidden 14336 by the SwiGLU rule).
    "8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    # Seconds on CPU; 4 queries per kv head; n_kv_heads=2 so a 1x4 mesh replicates kv heads.
    "tiny": LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64,
                        norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=16384),
    # Benchmarks: about 0.6 GB of float32 weights, far above any CPU cache.
    "small": LlamaConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=32768, multiple_of=256,
                         norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=8192),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
