"""Parity metrics: small pure functions of an implementation output `a` and a reference `b`.

Both sides are cast to float64 first, so a metric measures the inputs and not the arithmetic that compares
them. Shapes must match exactly: broadcasting would hide a missing head or a transposed axis.
See docs/architecture.md#metrics for what each metric means and why several are reported together.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# Unit roundoff u = 2**-(p) for a p+1 bit significand: the largest relative error of rounding one exact value
# into the dtype. Kept as data so that bfloat16 needs no ml_dtypes import.
UNIT_ROUNDOFF = {
    "float64": 2.0 ** -53,
    "float32": 2.0 ** -24,
    "bfloat16": 2.0 ** -8,
    "float16": 2.0 ** -11,
}
DEFAULT_TOPK = 5


def as_float64(x: Any) -> np.ndarray:
    """Cast numpy, JAX or torch arrays (bfloat16 included) to a float64 numpy array."""
    if type(x).__module__.startswith("torch"):  # torch cannot hand bfloat16 to numpy directly
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as float64, refusing shape mismatches instead of broadcasting over them."""
    a, b = as_float64(a), as_float64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {b.shape}")
    return a, b


def nonfinite_count(x: Any) -> int:
    """How many NaN or Inf entries `x` holds; any at all fails a parity check."""
    return int(np.size(x) - np.count_nonzero(np.isfinite(as_float64(x))))


def check_finite(actual: Any, expected: Any) -> str | None:
    """None when both sides are finite, else a sentence naming the side, the count and the first bad index."""
    problems = []
    for side, x in (("actual", actual), ("expected", expected)):
        x = as_float64(x)
        bad = ~np.isfinite(x)
        if bad.any():
            first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape))
            problems.append(f"{side} has {int(bad.sum())} NaN/Inf of {x.size} (first at {first}: {x[first]})")
    return "; ".join(problems) or None


def max_abs(a: Any, b: Any) -> float:
    """Largest elementwise |a - b|; scale-dependent, so reported more than bounded."""
    a, b = _pair(a, b)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def rel_l2(a: Any, b: Any) -> float:
    """||a - b|| / ||b||: the error relative to the reference's size, blind to where it sits.

    A zero reference has no size to be relative to: the result is 0.0 when `a` is zero too and +inf
    otherwise, so any deviation from an exactly-zero reference fails an upper bound (max_abs says how much).
    """
    a, b = _pair(a, b)
    err, ref = float(np.linalg.norm((a - b).ravel())), float(np.linalg.norm(b.ravel()))
    if ref == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / ref


def pcc(a: Any, b: Any) -> float:
    """Pearson correlation of the flattened arrays; the field's habit, blind to scale and offset errors.

    Undefined when a side is constant: identical inputs give 1.0, otherwise 0.0 (no linear relation shown).
    """
    a, b = _pair(a, b)
    da, db = a.ravel() - a.mean(), b.ravel() - b.mean()
    na, nb = float(np.linalg.norm(da)), float(np.linalg.norm(db))
    if na == 0.0 or nb == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(da, db) / (na * nb))


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of the flattened arrays (blind to scale); zero vectors: 1.0 if equal, else 0.0."""
    a, b = _pair(a, b)
    na, nb = float(np.linalg.norm(a.ravel())), float(np.linalg.norm(b.ravel()))
    if na == 0.0 or nb == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def bias_z(a: Any, b: Any) -> float:
    """z-score of the signed error along the reference: sqrt(N) * |cos(a - b, b)|.

    A systematic deviation that scales the output (a ~ (1 + s) b: a wrong RMSNorm eps on small rows, a norm or
    softmax without its float32 upcast) puts the error along b, and the statistic grows as sqrt(N); rounding
    noise that is independent of b gives |N(0, 1)| whatever its size, so over ~1e5 elements it averages out
    where rel_l2 cannot tell a bias from noise. (<d, b> has standard deviation ||d|| ||b|| / sqrt(N) for
    independent errors d.) 0.0 when either side of the cosine is zero.
    """
    a, b = _pair(a, b)
    d = (a - b).ravel()
    nd, nb = float(np.linalg.norm(d)), float(np.linalg.norm(b.ravel()))
    if nd == 0.0 or nb == 0.0 or not (math.isfinite(nd) and math.isfinite(nb)):
        return 0.0 if nd == 0.0 or nb == 0.0 else math.inf
    return float(math.sqrt(d.size) * abs(float(np.dot(d, b.ravel()))) / (nd * nb))


def bias_spread(b: Any) -> float:
    """How wide bias_z spreads under pure rounding noise, relative to a Gaussian-shaped reference.

    Rounding is relative: an element's error scales with |b_i|, so <d, b> has standard deviation
    ~ u sqrt(sum b_i^4) and bias_z's null spread is kappa = sqrt(N sum b^4) / sum b^2. A Gaussian reference has
    kappa = sqrt(3), where bias_z's bounds were set; a heavy-tailed one (a trained model's massive activations,
    one dominant logit per position) has kappa in the tens or hundreds, and a one-ulp rounding of its few huge
    entries lies along b. Returns max(1, kappa / sqrt(3)): the factor by which bias_z bounds widen."""
    b = as_float64(b).ravel()
    sum2 = float(np.dot(b, b))
    if b.size == 0 or sum2 == 0.0 or not math.isfinite(sum2):
        return 1.0
    kappa = math.sqrt(b.size * float(np.sum(b ** 4))) / sum2
    return max(1.0, kappa / math.sqrt(3.0))


def worst_index(a: Any, b: Any) -> tuple[int, ...]:
    """Index of the largest |a - b| (NaN counts as worst), so a failure can say where it is wrong."""
    a, b = _pair(a, b)
    if a.size == 0:
        return ()
    diff = np.abs(a - b)
    diff[np.isnan(diff)] = np.inf
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), a.shape))


def log_softmax(logits: Any) -> np.ndarray:
    """float64 log-softmax over the last axis, shifted by the max so large logits do not overflow."""
    x = as_float64(logits)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _positions(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits as (positions, vocab), every leading axis being a position."""
    a, b = _pair(a, b)
    if a.ndim == 0:
        raise ValueError("logits need a vocab axis (the last one)")
    return a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])


def kl(a: Any, b: Any) -> float:
    """Max over positions of KL(softmax(b) || softmax(a)): the worst next-token distribution the reference sees."""
    a, b = _positions(a, b)
    if a.shape[0] == 0:
        return 0.0
    la, lb = log_softmax(a), log_softmax(b)
    per_position = (np.exp(lb) * (lb - la)).sum(axis=-1)
    return float(max(per_position.max(), 0.0))  # a tiny negative is rounding of an exact zero


def top1(a: Any, b: Any) -> float:
    """Share of positions whose argmax token agrees (greedy decoding would choose the same)."""
    a, b = _positions(a, b)
    if a.shape[0] == 0:
        return 1.0
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


def _topk_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, in no particular order."""
    return np.argpartition(-x, k - 1, axis=-1)[:, :k]


def topk_overlap(a: Any, b: Any, k: int = DEFAULT_TOPK) -> float:
    """Mean share of the reference's top-k tokens that are also in the implementation's top-k."""
    a, b = _positions(a, b)
    if a.shape[0] == 0:
        return 1.0
    k = max(1, min(int(k), a.shape[-1]))
    ids_a, ids_b = _topk_ids(a, k), _topk_ids(b, k)
    shared = [len(np.intersect1d(ra, rb, assume_unique=True)) for ra, rb in zip(ids_a, ids_b)]
    return float(np.mean(shared) / k)


def logprob_gap(logits: Any, token_a: int, token_b: int) -> float:
    """|log p(token_a) - log p(token_b)| at one position: how near a tie two diverging greedy choices were."""
    lp = log_softmax(logits)
    return float(abs(lp[..., int(token_a)] - lp[..., int(token_b)]))


def dtype_resolution(dtype: Any) -> float:
    """Unit roundoff of a floating dtype given by name or numpy dtype (float32 if unknown)."""
    name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", str(dtype))
    return UNIT_ROUNDOFF.get(str(name), UNIT_ROUNDOFF["float32"])


def noise_ratio(actual: Any, expected: Any, oracle: Any, *, dtype: Any = None) -> float:
    """rel_l2(actual, oracle) / max(rel_l2(expected, oracle), floor): is the implementation as close to exact
    math as the reference at the same dtype is?

    The floor is the dtype's unit roundoff (2**-24 float32, 2**-8 bfloat16): rounding the exact result into the
    dtype already costs about that much, so a reference closer than it is "as exact as the dtype allows" and the
    ratio then reads as "implementation error in units of roundoff". Without it an exactly-equal reference
    (e.g. both sides computed in float64) would divide by zero. `dtype` defaults to the coarser float dtype of
    `actual` and `expected`.
    """
    if dtype is None:
        dtype = _coarser_dtype(actual, expected)
    floor = dtype_resolution(dtype)
    return rel_l2(actual, oracle) / max(rel_l2(expected, oracle), floor)


def _coarser_dtype(*xs: Any) -> str:
    """The float dtype name with the largest unit roundoff among the inputs (float32 when none is known)."""
    names = [str(getattr(x, "dtype", "")) for x in xs]
    known = [n for n in names if n in UNIT_ROUNDOFF] or ["float32"]
    return max(known, key=UNIT_ROUNDOFF.__getitem__)


def compute_metrics(actual: Any, expected: Any, *, oracle: Any = None, logits: bool = False,
                    dtype: Any = None, k: int = DEFAULT_TOPK) -> dict[str, float]:
    """Every metric that applies, as a flat dict of Python floats (JSON- and xdist-serialisable).

    Always: max_abs, rel_l2, pcc, cosine, bias_z and the NaN/Inf counts of each side. noise_ratio only with an
    oracle; kl, top1 and topk_overlap only for logits (last axis = vocab). Raises ValueError on shape mismatch.
    """
    dtype = dtype if dtype is not None else _coarser_dtype(actual, expected)
    a, b = _pair(actual, expected)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf inputs are reported, not warned about
        out = {
            "max_abs": max_abs(a, b), "rel_l2": rel_l2(a, b), "pcc": pcc(a, b), "cosine": cosine(a, b),
            "bias_z": bias_z(a, b),
            "nonfinite_actual": float(nonfinite_count(a)), "nonfinite_expected": float(nonfinite_count(b)),
        }
        if oracle is not None:
            o = as_float64(oracle)
            _pair(a, o)
            out["noise_ratio"] = noise_ratio(a, b, o, dtype=dtype)
        if logits:
            out.update(kl=kl(a, b), top1=top1(a, b), topk_overlap=topk_overlap(a, b, k))
    return {name: float(value) for name, value in out.items()}
