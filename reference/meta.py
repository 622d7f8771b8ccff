"""Meta's official Llama 3 model (pip package llama-models, `llama_models.llama3.model`) as an oracle.

Meta's own modules and functions run unmodified at the requested dtype ('float32' or 'bfloat16') and decide where
they upcast; inputs and outputs are NumPy (float32 arrays holding the run dtype's values). The one exception: for
RoPE scaling other than Llama 3.1's, `meta_rope_scaling` swaps in a copy of Meta's hard-coded `apply_scaling` with
the config's numbers (meta-llama/llama-models#241). `ensure_model_parallel()` sets up the torch.distributed and
fairscale groups Meta's layers need. How `start_pos` and the KV cache are read: docs/internals.md#meta-llama-models.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import io
import json
import socket
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from llama_spec.config import LLAMA31_ROPE_SCALING, LlamaConfig, RopeScaling
from reference.layers import ATTENTION_KEYS, captured, layer_state
from reference.torch_utils import capture, load_module, to_numpy, to_torch, torch_dtype

_INIT_LOCK = threading.Lock()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model_parallel() -> None:
    """Initialise torch.distributed (gloo, loopback, world size 1) and fairscale model parallel size 1, once.

    Safe to call any number of times. Each pytest-xdist worker is its own process and picks its own free port
    (bind to port 0), so workers never collide; a port lost to a race between probing and binding is retried.
    """
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    with _INIT_LOCK:
        if not dist.is_initialized():
            error = None
            for _ in range(5):
                try:
                    dist.init_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                            world_size=1, rank=0, timeout=datetime.timedelta(seconds=60))
                    break
                except (RuntimeError, OSError) as err:  # port taken between probe and bind
                    error = err
            else:
                raise RuntimeError(f"could not initialise torch.distributed on loopback: {error}") from error
        if dist.get_world_size() != 1:
            raise RuntimeError(f"Meta reference needs a world size of 1; torch.distributed already runs with "
                               f"{dist.get_world_size()} ranks in this process")
        if not fs_init.model_parallel_is_initialized():
            # fairscale prints three "> initializing ..." lines on rank 0; keep test output clean.
            with contextlib.redirect_stdout(io.StringIO()):
                fs_init.initialize_model_parallel(1)
        if fs_init.get_model_parallel_world_size() != 1:
            raise RuntimeError("fairscale model parallel is already initialised with a size other than 1")


def _meta():
    """The llama_models module, imported after the process group exists (its layers query fairscale)."""
    ensure_model_parallel()
    from llama_models.llama3 import model

    return model


# The fields of Meta's params.json that llama-models' ModelArgs reads.
MODEL_ARGS_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                     "norm_eps", "rope_theta", "use_scaled_rope")


def model_args(config: LlamaConfig, max_batch_size: int, max_seq_len: int):
    """Meta ModelArgs from our config (every params.json field ModelArgs knows) plus the cache sizes."""
    from llama_models.llama3.args import ModelArgs

    params = {name: getattr(config, name) for name in MODEL_ARGS_FIELDS}
    return ModelArgs(**params, max_batch_size=max_batch_size, max_seq_len=max_seq_len)


def _apply_scaling(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """llama_models.llama3.model.apply_scaling with `scaling`'s numbers in place of its hard-coded 8, 1, 4, 8192."""
    scale_factor, low_freq_factor = scaling.factor, scaling.low_freq_factor
    high_freq_factor, old_context_len = scaling.high_freq_factor, scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return torch.where((wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
                       (1 - smooth) * new_freqs / scale_factor + smooth * new_freqs, new_freqs)


@contextlib.contextmanager
def meta_rope_scaling(config: LlamaConfig):
    """While the block runs, Meta's precompute_freqs_cis scales by `config.rope_scaling`: as shipped for Llama
    3.1's parameters or none, through `_apply_scaling` for any other (restored on exit)."""
    m = _meta()
    if config.rope_scaling is None or config.rope_scaling == LLAMA31_ROPE_SCALING:
        yield
        return
    shipped = m.apply_scaling
    m.apply_scaling = functools.partial(_apply_scaling, scaling=config.rope_scaling)
    try:
        yield
    finally:
        m.apply_scaling = shipped


def meta_causal_mask(seqlen: int, start_pos: int, like: torch.Tensor) -> torch.Tensor | None:
    """The additive causal mask exactly as `Transformer.forward` builds it: None for one token, else
    (seqlen, start_pos + seqlen) with zeros over the cached prefix and -inf above the diagonal, at h's dtype."""
    if seqlen <= 1:
        return None
    mask = torch.full((seqlen, seqlen), float("-inf"), device=like.device)
    mask = torch.triu(mask, diagonal=1)
    return torch.hstack([torch.zeros((seqlen, start_pos), device=like.device), mask]).type_as(like)


def freqs_cis(config: LlamaConfig, end: int) -> torch.Tensor:
    """Meta's precompute_freqs_cis for positions 0 .. end-1 with the config's RoPE scaling."""
    m = _meta()
    with meta_rope_scaling(config):
        return m.precompute_freqs_cis(config.head_dim, end, config.rope_theta, config.use_scaled_rope)


@contextlib.contextmanager
def _llama_models_defaults():
    """llama-models' loader sets torch's default tensor type to bfloat16 and prints the shards it reads: keep the
    process's default dtype and the test output as they were."""
    previous = torch.get_default_dtype()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch.set_default_dtype(previous)


# ---- the full model ---------------------------------------------------------------------------


class MetaReference:
    """Meta's `Transformer` at `dtype`, loaded with Meta-layout weights (or, by `from_checkpoint`, from a
    checkpoint directory by llama-models itself; `config` is then None: the suite's parser is not consulted).

    `max_seq_len` sizes Meta's KV cache (max_batch_size x max_seq_len x n_kv_heads x head_dim per layer, for
    keys and for values) and its RoPE table (2 x max_seq_len positions); None means `config.max_seq_len`.
    """

    def __init__(self, config: LlamaConfig, weights: Mapping[str, np.ndarray], dtype: str,
                 max_batch_size: int = 4, max_seq_len: int | None = None):
        m = _meta()
        self.config = config
        self.dtype = str(dtype)
        self.torch_dtype = torch_dtype(dtype)
        self.max_batch_size = max_batch_size
        self.max_seq_len = config.max_seq_len if max_seq_len is None else max_seq_len
        with meta_rope_scaling(config):
            transformer = m.Transformer(model_args(config, max_batch_size, self.max_seq_len))
        self.model = load_module(transformer, weights, self.torch_dtype)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, dtype: str, max_batch_size: int = 4,
                        max_seq_len: int = 2048) -> "MetaReference":
        """A Meta checkpoint directory loaded as llama-models' `Llama3.build` loads it, at model-parallel size 1:
        `ModelArgs(max_seq_len=..., max_batch_size=..., **params.json)`, its `maybe_reshard_state_dict` over the
        consolidated.NN.pth (merging model-parallel shards), `Transformer(args)`, `load_state_dict(strict=True)`;
        then cast to `dtype`. RoPE scaling is whatever llama-models applies (factor 8 whenever use_scaled_rope).
        `reference.config_check` compares that reading with the suite's."""
        from llama_models.checkpoint import maybe_reshard_state_dict
        from llama_models.llama3.args import ModelArgs

        m, directory = _meta(), Path(directory)
        params_path = directory / "params.json"
        try:
            params = json.loads(params_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{params_path}: unreadable ({err}); a Meta checkpoint needs params.json") from None
        shards = sorted(directory.glob("*.pth"))
        if not shards:
            raise ValueError(f"{directory}: no *.pth file; a Meta checkpoint holds consolidated.NN.pth")
        args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        self = cls.__new__(cls)
        self.config, self.dtype, self.torch_dtype = None, str(dtype), torch_dtype(dtype)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        with _llama_models_defaults():
            state = maybe_reshard_state_dict(shards, n_kv_heads=args.n_kv_heads)
        model = m.Transformer(args)
        model.load_state_dict(state, strict=True)
        self.model = model.to(self.torch_dtype).eval()
        return self

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        """Meta's `Transformer.forward(tokens, start_pos)`; logits (B, S, V) float32, plus the named
        intermediates of this chunk (see reference/layers.py) when `capture`."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
        bsz, seqlen = tokens.shape
        if bsz > self.max_batch_size or start_pos + seqlen > self.max_seq_len:
            raise ValueError(f"batch {bsz} at positions [{start_pos}, {start_pos + seqlen}) exceeds the KV cache "
                             f"({self.max_batch_size} x {self.max_seq_len})")
        tokens_t = torch.from_numpy(tokens.astype(np.int64))
        if not capture:
            return to_numpy(self.model.forward(tokens_t, start_pos))
        with self._capture() as store:
            logits = to_numpy(self.model.forward(tokens_t, start_pos))
        return logits, captured(store, len(self.model.layers), "Meta")

    __call__ = forward

    def reset_cache(self) -> None:
        """Zero Meta's KV caches (a fresh model's state)."""
        with torch.inference_mode():  # after a forward the caches may be inference tensors
            for layer in self.model.layers:
                layer.attention.cache_k.zero_()
                layer.attention.cache_v.zero_()

    def _capture(self):
        """Hooks on Meta's modules, and `apply_rotary_emb` wrapped while the forward runs."""
        model = self.model
        outputs = {"embedding": model.tok_embeddings, "final_norm": model.norm, "logits": model.output}
        for i, layer in enumerate(model.layers):
            p = f"layers.{i}."
            outputs.update({p + "attention_norm": layer.attention_norm, p + "attention_out": layer.attention.wo,
                            p + "ffn_norm": layer.ffn_norm, p + "mlp_out": layer.feed_forward.w2,
                            p + "block_out": layer})
        return capture(outputs, [layer.attention for layer in model.layers], _meta(), "apply_rotary_emb", to_numpy)


# ---- components, for isolated tests ------------------------------------------------------------


def meta_embedding(tokens, weight, dtype: str) -> np.ndarray:
    """Meta's token embedding, the `VocabParallelEmbedding` its Transformer builds (at model-parallel size 1 the
    whole table), with `weight` (vocab, dim) at dtype."""
    m, td = _meta(), torch_dtype(dtype)
    vocab, dim = np.shape(weight)
    table = load_module(m.VocabParallelEmbedding(vocab, dim, init_method=lambda x: x), {"weight": weight}, td)
    with torch.inference_mode():
        return to_numpy(table(torch.from_numpy(np.asarray(tokens, np.int64))))


def meta_rms_norm(x, weight, eps: float, dtype: str) -> np.ndarray:
    """Meta's RMSNorm(x) with `weight`, at dtype."""
    m, td = _meta(), torch_dtype(dtype)
    norm = load_module(m.RMSNorm(np.shape(weight)[0], eps=eps), {"weight": weight}, td)
    with torch.inference_mode():
        return to_numpy(norm(to_torch(x, td)))


def meta_rope(q, k, config: LlamaConfig, dtype: str, start_pos: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Meta's apply_rotary_emb on q (B,S,H,hd) and k (B,S,KV,hd) (interleaved layout) at positions
    start_pos .. start_pos+S-1, with the table of `freqs_cis(config)`."""
    m, td = _meta(), torch_dtype(dtype)
    seqlen = np.shape(q)[1]
    freqs = freqs_cis(config, start_pos + seqlen)[start_pos:start_pos + seqlen]
    with torch.inference_mode():
        q_out, k_out = m.apply_rotary_emb(to_torch(q, td), to_torch(k, td), freqs_cis=freqs)
    return to_numpy(q_out), to_numpy(k_out)


def _run_chunks(module, x_chunks: Sequence, config: LlamaConfig, td: torch.dtype, start_pos: int) -> list:
    """Feed chunks one after another through a Meta Attention or TransformerBlock: chunk c goes to cache slot
    `offset` (tokens before it), RoPE position start_pos + offset, with Transformer.forward's mask."""
    total = sum(np.shape(x)[1] for x in x_chunks)
    freqs = freqs_cis(config, start_pos + total)
    outputs, offset = [], 0
    with torch.inference_mode():
        for x in x_chunks:
            h = to_torch(x, td)
            seqlen = h.shape[1]
            fc = freqs[start_pos + offset:start_pos + offset + seqlen]
            outputs.append(to_numpy(module(h, offset, fc, meta_causal_mask(seqlen, offset, h))))
            offset += seqlen
    return outputs


def _chunk_args(x_chunks: Sequence, config: LlamaConfig):
    shapes = [np.shape(x) for x in x_chunks]
    if not shapes or any(len(s) != 3 or s[0] != shapes[0][0] or s[2] != config.dim for s in shapes):
        raise ValueError(f"x_chunks must be a non-empty list of (B, S_i, {config.dim}) arrays, got {shapes}")
    return model_args(config, max_batch_size=shapes[0][0], max_seq_len=sum(s[1] for s in shapes))


def meta_attention(x_chunks: Sequence, layer_weights: Mapping[str, np.ndarray], config: LlamaConfig, dtype: str,
                   start_pos: int = 0) -> list[np.ndarray]:
    """Meta's Attention module (wq, wk, wv, wo from `layer_weights`, Meta layout) over `x_chunks`, one after
    another, so chunk 2+ read the KV cache the earlier chunks wrote. Returns wo's output per chunk."""
    m, td = _meta(), torch_dtype(dtype)
    attention = m.Attention(_chunk_args(x_chunks, config))
    load_module(attention, {f"{k}.weight": layer_weights[k] for k in ATTENTION_KEYS}, td)
    return _run_chunks(attention, x_chunks, config, td, start_pos)


def meta_feed_forward(x, w1, w2, w3, dtype: str) -> np.ndarray:
    """Meta's FeedForward, w2(silu(w1 x) * w3 x), with Meta-layout (out, in) weights."""
    m, td = _meta(), torch_dtype(dtype)
    dim, hidden = np.shape(w1)[1], np.shape(w1)[0]
    # FeedForward derives its width: int(2*hidden_dim/3) rounded up to multiple_of. With multiple_of=hidden
    # and hidden_dim=hidden, 0 < int(2*hidden/3) <= hidden rounds up to exactly `hidden`.
    ff = m.FeedForward(dim=dim, hidden_dim=hidden, multiple_of=hidden, ffn_dim_multiplier=None)
    load_module(ff, {"w1.weight": w1, "w2.weight": w2, "w3.weight": w3}, td)
    with torch.inference_mode():
        return to_numpy(ff(to_torch(x, td)))


def meta_block(x, layer_weights: Mapping[str, np.ndarray], config: LlamaConfig, dtype: str,
               start_pos: int = 0) -> np.ndarray:
    """Meta's TransformerBlock on x (B,S,D), first token at RoPE position start_pos, no earlier context."""
    m, td = _meta(), torch_dtype(dtype)
    block = m.TransformerBlock(0, _chunk_args([x], config))
    state = {name[len("layers.0."):]: value for name, value in layer_state(layer_weights, 0).items()}
    load_module(block, state, td)
    return _run_chunks(block, [x], config, td, start_pos)[0]


def meta_head(x, norm_weight, output_weight, eps: float, dtype: str) -> np.ndarray:
    """Meta's Transformer tail on hidden states x (B,S,D): `self.output(self.norm(h)).float()`; at model-parallel
    size 1 fairscale's ColumnParallelLinear is F.linear."""
    m, td = _meta(), torch_dtype(dtype)
    norm = load_module(m.RMSNorm(np.shape(norm_weight)[0], eps=eps), {"weight": norm_weight}, td)
    with torch.inference_mode():
        h = norm(to_torch(x, td))
        return to_numpy(torch.nn.functional.linear(h, to_torch(output_weight, td)).float())
