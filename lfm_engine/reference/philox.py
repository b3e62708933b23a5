"""Plain-numpy Philox4x32-10 and the engine's stream-id rule (docs/spec/merge.md "Randomness").

This module is the definition every backend's random masks are compared against,
bit for bit. Everything is vectorised numpy on uint64 arrays holding 32-bit values
(a 32x32-bit product fits exactly in 64 bits); there is no per-element Python loop.

Philox4x32-10 (Salmon et al., SC11 "Parallel Random Numbers: As Easy as 1, 2, 3"):
counter c = (c0, c1, c2, c3), key k = (k0, k1), ten rounds of

    (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2          (32x32 -> 64-bit products)
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    k = (k0 + W0, k1 + W1) mod 2^32                        (key bump between rounds)

with M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85. The output
is the final counter. (The key bump after the tenth round is never used.)

Engine rule, for element e of one (tensor, model) stream:
    key     = (seed & 0xffffffff, seed >> 32)
    counter = (q & 0xffffffff, q >> 32, stream, 0),   q = e // 4
    draw(e) = output word (e % 4) of that block
    kept    iff draw(e) < floor(p * 2^32)   (threshold computed in double; p = 1 keeps all)
    stream  = low32(FNV-1a-64(name as UTF-8)) ^ ((position << 24) & 0xffffffff)
"""
from __future__ import annotations

import math

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3

_MASK32 = np.uint64(0xFFFFFFFF)
_MASK64 = (1 << 64) - 1

# Elements per internal chunk in philox_draws: bounds the temporaries (about 20 arrays
# of 8 bytes per block) to a few hundred MB for arbitrarily large tensors.
_CHUNK_BLOCKS = 1 << 22


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash of ``data`` (offset 0xcbf29ce484222325, prime 0x100000001b3)."""
    h = FNV64_OFFSET
    for byte in bytes(data):
        h ^= byte
        h = (h * FNV64_PRIME) & _MASK64
    return h


def stream_id(name: str, position: int) -> int:
    """Philox stream id of (tensor name, model position): a 32-bit integer.

    low 32 bits of FNV-1a-64(name encoded as UTF-8) XOR ((position << 24) & 0xffffffff).
    ``position`` is the model's 0-based index among the non-base inputs.
    """
    if not isinstance(name, str):
        raise TypeError(f"stream_id: tensor name must be a str, got {type(name).__name__}")
    position = int(position)
    if position < 0:
        raise ValueError(f"stream_id: model position must be >= 0, got {position}")
    return (fnv1a64(name.encode("utf-8")) & 0xFFFFFFFF) ^ ((position << 24) & 0xFFFFFFFF)


def _u32(x) -> np.ndarray:
    """A numpy uint64 array holding the given 32-bit values (checked to fit)."""
    a = np.asarray(x)
    if a.dtype.kind not in "ui":
        a = a.astype(np.uint64)
    a = a.astype(np.uint64)
    if a.size and int(a.max()) > 0xFFFFFFFF:
        raise ValueError("Philox words must lie in [0, 2^32)")
    return a


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> np.ndarray:
    """Philox4x32-10 blocks, vectorised: returns a uint32 array of shape [4, *broadcast_shape].

    Each argument is an integer scalar or array of 32-bit words; they broadcast together.
    Row j of the result is output word j.
    """
    c0, c1, c2, c3, k0, k1 = np.broadcast_arrays(*(_u32(v) for v in (c0, c1, c2, c3, k0, k1)))
    # Work on copies: broadcast_arrays returns read-only views.
    c0, c1, c2, c3 = (np.array(v, dtype=np.uint64) for v in (c0, c1, c2, c3))
    k0, k1 = np.array(k0, dtype=np.uint64), np.array(k1, dtype=np.uint64)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    shift = np.uint64(32)
    for r in range(PHILOX_ROUNDS):
        p0 = m0 * c0  # < 2^64: exact in uint64
        p1 = m1 * c2
        hi0, lo0 = p0 >> shift, p0 & _MASK32
        hi1, lo1 = p1 >> shift, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < PHILOX_ROUNDS:
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def philox_draws(seed: int, stream: int, n: int, start: int = 0) -> np.ndarray:
    """The engine's 32-bit draws for elements e = start .. start+n-1 of one stream.

    Returns a uint32 numpy array of length n; entry j is draw(start + j) as defined in
    the module docstring. ``seed`` lies in [0, 2^64), ``stream`` in [0, 2^32).
    """
    seed, stream, n, start = int(seed), int(stream), int(n), int(start)
    if not 0 <= seed < 2**64:
        raise ValueError(f"philox_draws: seed must lie in [0, 2^64), got {seed}")
    if not 0 <= stream < 2**32:
        raise ValueError(f"philox_draws: stream id must lie in [0, 2^32), got {stream}")
    if n < 0 or start < 0 or start + n > 2**66:
        raise ValueError(f"philox_draws: bad element range start={start}, n={n}")
    out = np.empty(n, dtype=np.uint32)
    if n == 0:
        return out
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    q_first, q_last = start // 4, (start + n - 1) // 4
    pos = 0  # elements written so far
    q = q_first
    while q <= q_last:
        q_end = min(q_last + 1, q + _CHUNK_BLOCKS)
        # Block indices may exceed 2^63 only in theory (n is bounded by memory);
        # build them as uint64 from a Python int offset to stay exact.
        qs = np.arange(q_end - q, dtype=np.uint64) + np.uint64(q)
        blocks = philox4x32_10(qs & _MASK32, qs >> np.uint64(32), stream, 0, k0, k1)
        flat = blocks.T.reshape(-1)  # element-major: block q words 0..3 = elements 4q..4q+3
        lo = start - 4 * q if q == q_first else 0
        take = min(flat.size - lo, n - pos)
        out[pos:pos + take] = flat[lo:lo + take]
        pos += take
        q = q_end
    return out


def keep_threshold(p: float) -> int:
    """floor(p * 2^32) computed in double, clamped to [0, 2^32]; draw < threshold keeps.

    p >= 1 gives 2^32 (every 32-bit draw is below it: keep all); p <= 0 gives 0 (keep none).
    """
    p = float(p)
    if math.isnan(p):
        raise ValueError("keep_threshold: probability is NaN")
    if p >= 1.0:
        return 1 << 32
    if p <= 0.0:
        return 0
    return int(math.floor(p * 4294967296.0))


def keep_mask_np(draws: np.ndarray, thresholds) -> np.ndarray:
    """Boolean keep mask: draws < thresholds, compared in int64 so a threshold of 2^32 works."""
    return draws.astype(np.int64) < np.asarray(thresholds, dtype=np.int64)
