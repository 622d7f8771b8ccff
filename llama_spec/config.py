"""Llama 3 hyper-parameters, read from Meta's params.json or HF's config.json (both of its styles).

Field names follow Meta's params.json so a checkpoint's file maps onto this class one to one; the two things
params.json cannot say are carried explicitly: the RoPE scaling parameters (`rope_scaling`, HF's llama3
rope type) and whether the output projection is the embedding (`tie_word_embeddings`, Llama 3.2 1B/3B).

What Meta's params.json leaves implicit: it has only `use_scaled_rope`. llama-models 0.3.0's `apply_scaling`
hard-codes factor 8 (Llama 3.1's), but Llama 3.2 1B and 3B use factor 32 (their config.json; HF's
convert_llama_weights_to_hf.py picks 32 by the version it is told; meta-llama/llama-models#166 and #241), and
their params.json says nothing of the tied embeddings either. So a params.json with exactly the published
Llama 3.2 1B or 3B shape reads as factor 32 and tied (`_IMPLIED_BY_SHAPE`), any other as Llama 3.1's scaling.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (Meta's apply_scaling, HF rope_type 'llama3'), under HF's names:
    wavelengths longer than original/low_freq_factor are slowed by `factor`, shorter than
    original/high_freq_factor are kept, and in between the frequency blends linearly."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)} must be positive" for name in
                    ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                    if not getattr(self, name) > 0]
        if not problems and self.high_freq_factor <= self.low_freq_factor:
            problems.append(f"high_freq_factor={self.high_freq_factor} must exceed "
                            f"low_freq_factor={self.low_freq_factor}")
        if problems:
            raise ValueError("invalid RopeScaling: " + "; ".join(problems))

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", "factor": float(self.factor), "low_freq_factor": float(self.low_freq_factor),
                "high_freq_factor": float(self.high_freq_factor),
                "original_max_position_embeddings": int(self.original_max_position_embeddings)}


# Llama 3.1 (and 3.2 11B/90B, 3.3 70B): the constants llama-models' apply_scaling hard-codes.
LLAMA31_ROPE_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192)
# Llama 3.2 1B and 3B (their config.json).
LLAMA32_ROPE_SCALING = dataclasses.replace(LLAMA31_ROPE_SCALING, factor=32.0)



@dataclasses.dataclass(frozen=True)
class JsonType:
    """The JSON type a config field needs, checked before any value is used: a quoted number or a boolean where a
    number belongs would otherwise fail somewhere inside the arithmetic, or pass (bool is an int in Python)."""
    name: str  # as the error says it: "an integer"
    types: tuple[type, ...]  # the Python types json.loads gives for it (bool only where named)
    example: str  # what to write instead
    nullable: bool = False

    def fits(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool):
            return bool in self.types
        return isinstance(value, self.types)

    def or_null(self) -> "JsonType":
        return dataclasses.replace(self, nullable=True)


INTEGER = JsonType("an integer", (int,), "a whole number such as 4096")
NUMBER = JsonType("a number", (int, float), "a number such as 1e-05")
BOOLEAN = JsonType("true or false", (bool,), "true or false")
STRING = JsonType("a string", (str,), 'a quoted string such as "llama"')
ARRAY = JsonType("an array", (list,), 'an array such as ["LlamaForCausalLM"]')
OBJECT = JsonType("an object", (dict,), 'an object such as {"rope_type": "llama3", ...}')

# Meta's params.json fields and their types (None where llama-models' ModelArgs defaults them); those without a
# default must be present. No max_seq_len: it is a runtime argument of llama-models' Llama3.build, which passes it
# beside **params (a params.json holding it would not load there).
PARAMS_FIELDS = {"dim": INTEGER, "n_layers": INTEGER, "n_heads": INTEGER, "n_kv_heads": INTEGER.or_null(),
                 "vocab_size": INTEGER, "multiple_of": INTEGER, "ffn_dim_multiplier": NUMBER.or_null(),
                 "norm_eps": NUMBER, "rope_theta": NUMBER, "use_scaled_rope": BOOLEAN}
_REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size")
# The published params.json shapes whose scaling and tying are implied, not stated (see the module docstring):
# (dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier) -> (name, scaling, tied).
_IMPLIED_BY_SHAPE = {
    (2048, 16, 32, 8, 128256, 256, 1.5): ("Llama 3.2 1B", LLAMA32_ROPE_SCALING, True),
    (3072, 28, 24, 8, 128256, 256, 1.0): ("Llama 3.2 3B", LLAMA32_ROPE_SCALING, True),
}
# The HF config.json fields read, with transformers' LlamaConfig default where one is silently assumed: a file
# that leaves them out would be read one way here and another by transformers, so it is refused instead.
_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "rms_norm_eps", "max_position_embeddings")
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0}
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# The types of the config.json fields read here or by transformers for the HF reference (either style), and of the
# RoPE object's (`rope_parameters` or the hub's `rope_scaling`; `type` is the hub's older name of `rope_type`).
HF_FIELDS = {"architectures": ARRAY, "model_type": STRING, "hidden_size": INTEGER, "intermediate_size": INTEGER,
             "num_hidden_layers": INTEGER, "num_attention_heads": INTEGER,
             "num_key_value_heads": INTEGER.or_null(), "head_dim": INTEGER.or_null(), "vocab_size": INTEGER,
             "rms_norm_eps": NUMBER, "max_position_embeddings": INTEGER, "rope_theta": NUMBER,
             "rope_parameters": OBJECT.or_null(), "rope_scaling": OBJECT.or_null(), "hidden_act": STRING,
             "tie_word_embeddings": BOOLEAN, "attention_bias": BOOLEAN, "mlp_bias": BOOLEAN}
HF_ROPE_FIELDS = {"rope_theta": NUMBER, "rope_type": STRING, "type": STRING, "factor": NUMBER,
                  "low_freq_factor": NUMBER, "high_freq_factor": NUMBER, "original_max_position_embeddings": INTEGER}
HF_STYLES = ("rope_parameters", "hub")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int = None  # type: ignore[assignment]  # None means n_heads: __post_init__ sets it, so it is an int
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = LLAMA31_ROPE_SCALING
    tie_word_embeddings: bool = False
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
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            problems.append(f"rope_scaling={self.rope_scaling!r} must be a RopeScaling or None")
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

    @property
    def use_scaled_rope(self) -> bool:
        """Meta's params.json flag: whether any RoPE scaling applies."""
        return self.rope_scaling is not None

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---- Meta params.json -------------------------------------------------------------------

    def _shape_key(self) -> tuple:
        return (self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.multiple_of,
                self.ffn_dim_multiplier)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str = "params.json") -> "LlamaConfig":
        unknown = sorted(set(params) - set(PARAMS_FIELDS))
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; expected only {sorted(PARAMS_FIELDS)}")
        missing = [name for name in _REQUIRED if name not in params]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        check_types(params, PARAMS_FIELDS, source)
        values = dict(params)
        # Meta's checkpoints before 3.1 have no use_scaled_rope; its own ModelArgs defaults it to off.
        scaled = values.pop("use_scaled_rope", False)
        try:
            config = cls(**values, rope_scaling=None)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None
        _, implied, tied = _IMPLIED_BY_SHAPE.get(config._shape_key(), (None, LLAMA31_ROPE_SCALING, False))
        return config.replace(rope_scaling=implied if scaled else None, tie_word_embeddings=tied)

    @classmethod
    def from_params_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file; a Meta checkpoint directory needs params.json") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        except OSError as err:
            raise ValueError(f"{path}: cannot read ({err.strerror})") from None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a JSON object of Meta's fields, found {type(params).__name__}")
        return cls.from_params(params, source=str(path))

    def to_params(self) -> dict[str, Any]:
        """Meta's params.json; a ValueError names what it cannot say (it has only use_scaled_rope, and no tying:
        the rest is implied by the shape, as `from_params` reads it back)."""
        name, implied, tied = _IMPLIED_BY_SHAPE.get(self._shape_key(), ("this shape", LLAMA31_ROPE_SCALING, False))
        if self.rope_scaling is not None and self.rope_scaling != implied:
            raise ValueError(f"params.json cannot hold rope_scaling={self.rope_scaling}: it has only use_scaled_rope, "
                             f"which means {implied} for {name}; write an HF checkpoint (config.json) instead")
        if self.tie_word_embeddings != tied:
            raise ValueError(f"params.json cannot hold tie_word_embeddings={self.tie_word_embeddings}: Meta ties "
                             f"only Llama 3.2 1B/3B, by their shape; write an HF checkpoint (config.json) instead")
        return {name: getattr(self, name) for name in PARAMS_FIELDS}

    # ---- Hugging Face config.json -----------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Either style: transformers 5's `rope_parameters` (rope_theta inside), or the hub's `rope_scaling` dict
        (or null) beside a top-level `rope_theta`. Every scaling parameter is read; anything this model does not
        compute (another rope_type, biases, another activation) is refused naming the field."""
        check_types(hf, HF_FIELDS, source)
        missing = [key for key in _HF_REQUIRED if key not in hf]
        if missing:
            default = _HF_DEFAULTS.get(missing[0])
            assumed = f" (transformers would assume {default})" if default is not None else ""
            raise ValueError(f"{source}: missing field {missing[0]!r}{assumed}; a Llama 3 config.json states it")
        for key, supported in (("model_type", "llama"), ("hidden_act", "silu"), ("attention_bias", False),
                               ("mlp_bias", False)):
            if hf.get(key, supported) != supported:
                raise ValueError(f"{source}: {key}={hf[key]!r}; this suite computes Llama 3 with {key}={supported!r}")
        rope = _hf_rope(hf, source)
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if "rope_theta" in rope and "rope_theta" in hf and float(rope["rope_theta"]) != float(hf["rope_theta"]):
            raise ValueError(f"{source}: rope_theta={hf['rope_theta']} at the top level but {rope['rope_theta']} in "
                             "the RoPE parameters; keep one")
        if theta is None:
            raise ValueError(f"{source}: missing field 'rope_theta' (top level or in rope_parameters; transformers "
                             f"would assume {_HF_DEFAULTS['rope_theta']}); a Llama 3 config.json states it")
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            absent = [key for key in _ROPE_KEYS if key not in rope]
            if absent:
                raise ValueError(f"{source}: rope_type 'llama3' without {absent[0]!r}; state all of {list(_ROPE_KEYS)}")
            try:
                scaling = RopeScaling(**{key: rope[key] for key in _ROPE_KEYS})
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
        else:
            raise ValueError(f"{source}: rope_type={rope_type!r}; this suite computes RoPE 'default' or 'llama3'")
        dim, n_heads, hidden = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
        try:
            config = cls(
                dim=dim,
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads", n_heads),
                vocab_size=hf["vocab_size"],
                norm_eps=float(hf["rms_norm_eps"]),
                rope_theta=float(theta),
                rope_scaling=scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_seq_len=hf["max_position_embeddings"],
                # HF stores the SwiGLU width directly; multiple_of=hidden reproduces it exactly.
                multiple_of=hidden,
                ffn_dim_multiplier=None,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None
        if config.hidden_dim != hidden:
            raise ValueError(f"{source}: intermediate_size={hidden} cannot be expressed by Meta's SwiGLU rule")
        if hf.get("head_dim") is not None and hf["head_dim"] != config.head_dim:
            raise ValueError(f"{source}: head_dim={hf['head_dim']} but hidden_size/num_attention_heads = "
                             f"{config.head_dim}; this suite computes head_dim = hidden_size / num_attention_heads")
        return config

    def to_hf(self, style: str = "rope_parameters") -> dict[str, Any]:
        """config.json in transformers 5's style (`rope_parameters`, what save_pretrained writes) or the hub's
        (`rope_scaling` + top-level `rope_theta`, what Meta's repositories publish)."""
        if style not in HF_STYLES:
            raise ValueError(f"config.json style {style!r}: choose one of {list(HF_STYLES)}")
        scaling = self.rope_scaling.to_hf() if self.rope_scaling is not None else None
        if style == "rope_parameters":
            rope = {"rope_theta": self.rope_theta, **(scaling or {"rope_type": "default"})}
        else:
            rope = {"rope_scaling": scaling, "rope_theta": self.rope_theta}
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
            **({"rope_parameters": rope} if style == "rope_parameters" else rope),
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
        }


def _hf_rope(hf: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """The RoPE dict of either style; both present and different is refused (a loader knowing one style would
    silently take the other's values)."""
    parameters, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    for key, value in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        if value is not None:
            check_types(value, HF_ROPE_FIELDS, source, prefix=key + ".")
    if parameters is not None and scaling is not None:
        stripped = {k: v for k, v in parameters.items() if k != "rope_theta"}
        if stripped != {k: v for k, v in scaling.items() if k != "rope_theta"}:
            raise ValueError(f"{source}: rope_parameters and rope_scaling disagree ({dict(parameters)} vs "
                             f"{dict(scaling)}); keep one")
    return parameters if parameters is not None else (scaling or {})


def check_types(data: Mapping[str, Any], fields: Mapping[str, JsonType], source: str, prefix: str = "") -> None:
    """Raise a one-line ValueError naming the file, the first field of `fields` in `data` whose value has the wrong
    JSON type, the type it needs, what it holds and what to write."""
    for name, needed in fields.items():
        if name not in data or needed.fits(data[name]):
            continue
        value = data[name]
        wanted = needed.name + (" or null" if needed.nullable else "")
        raise ValueError(f"{source}: field '{prefix}{name}' must be {wanted}, got {_described(value)}; "
                         f"write {_unquoted(value, needed) or needed.example}")


def _described(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return "an array" if isinstance(value, list) else "an object"


def _unquoted(value: Any, needed: JsonType) -> str | None:
    """'128 without the quotes' when the string `value` holds a JSON value of the needed type, else None."""
    if not isinstance(value, str):
        return None
    try:
        inner = json.loads(value)
    except ValueError:
        return None
    return f"{value} without the quotes" if inner is not None and needed.fits(inner) else None


PRESETS: dict[str, LlamaConfig] = {
    # Exactly Meta's Llama 3.1 8B params.json (hidden 14336 by the SwiGLU rule).
    "8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE_SCALING),
    # Seconds on CPU; 4 queries per kv head; n_kv_heads=2 so a 1x4 mesh replicates kv heads.
    "tiny": LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64,
                        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE_SCALING,
                        max_seq_len=16384),
    # Benchmarks: about 0.6 GB of float32 weights, far above any CPU cache.
    "small": LlamaConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=32768, multiple_of=256,
                         norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE_SCALING,
                         max_seq_len=8192),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
