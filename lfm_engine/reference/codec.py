"""Task-vector codecs in plain torch: the definition every backend is compared with.

A codec stores delta = x - b (fine-tuned minus base) of one tensor in fewer bits
(docs/spec/codec.md). Every encoder here takes a float tensor ``delta`` and returns a dict
of *fields* (tensors) plus a dict of JSON-able *meta* options; every decoder rebuilds
the float32 delta from them. All arithmetic is float32 unless stated.

Matrix view. A delta of shape S is viewed as [rows, cols]:
    ndim >= 2: rows = S[0], cols = prod(S[1:])  (input dim(s) last, like nn.Linear)
    ndim == 1: rows = 1, cols = S[0];  ndim == 0: rows = cols = 1.
"Along the input dim" means along cols, inside one row.

Bit layouts (all "little-end first": element j of a run goes to the lowest free bits):
    bit masks (uint8):   element e -> byte e // 8, bit e % 8.
    sign1 signs (uint32 [rows, ceil(cols/32)]): element (r, c) -> word c // 32,
        bit c % 32; the bit is 1 iff delta < 0 (0 and +values decode to +scale).
        Padding bits past cols are 0.
    int4 (uint8 [rows, ceil(cols/2)]): element c -> byte c // 2, low nibble for even c;
        each nibble is the 4-bit two's complement of q in [-7, 7].
    int2 (uint8 [rows, ceil(cols/4)]): element c -> byte c // 4, bits 2*(c % 4)..+1;
        2-bit two's complement of q in [-1, 1].  Padding nibbles/pairs are 0.
    nf4 (uint8 [rows, ceil(cols/2)]): int4's nibble layout; each nibble is a code
        k in 0..15 of the NF4 code book (NF4_LEVELS).

Codecs (fields -> decode):
    sign1    signs, scales[rows] (or [1] with per_tensor=True), fp16 by default:
             delta_hat[r, c] = (bit ? -1 : +1) * scale[r]; scale = mean_c |delta[r, c]|
             (the L2-optimal scale of a sign code), mean taken in float64.
    int8/int4/int2  q (int8 [rows, cols]) or packed (uint8), scales [rows, ceil(cols/g)]:
             qmax = 127 / 7 / 1; s = fp16(absmax of the group / qmax) (the stored, rounded
             scale is the one used to quantize, so decode is consistent);
             q = clamp(round_half_even(delta / s), -qmax, qmax)  (s == 0 -> q = 0);
             delta_hat = q * s.
    nf4      packed (uint8), scales [rows, ceil(cols/g)]: QLoRA's NF4 code book L (16
             levels in [-1, 1], L[7] = 0) times one scale per group; s = fp16(absmax of
             the group); k = #{j : delta / s > (L[j] + L[j+1]) / 2} (the nearest level; a
             value on a midpoint takes the lower one), k = 7 where s == 0;
             delta_hat = L[k] * s. Same bits as int4 (4 + 16/g per param), 16 levels
             spaced like normal quantiles instead of 15 equal steps.
    ternary  mask (uint8 bits, flat), signs (uint8 bits of the k kept entries, in flat
             order: 1 = negative), alpha fp32 [1]: keep the k = max(1, floor(d*n)) largest
             |delta| (ties: lower flat index), alpha = mean |delta| over the kept entries;
             delta_hat = alpha * sign on kept entries, 0 elsewhere.
    sparse_int  mask (uint8 bits, flat), q (int8 [k] for bits=8, packed uint8 [ceil(k/2)]
             for bits=4), scales fp16 [ceil(k/g)]: keep entries by magnitude (exact k, as
             above) or DARE (Philox draw < d*2^32 with the engine's stream ids, kept values
             divided by d), then group-wise quantize the kept values (in flat order, groups
             of g kept values) exactly like intN.
    lowrank  A [r, cols], B [rows, r] (fp16 by default): delta ~= B @ A with
             B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (balanced, so fp16 holds both factors).
             r: fixed `rank`, or the smallest r whose energy sum_{i<r} s_i^2 reaches
             `energy` * ||delta||_F^2. method "randomized" (range finder, oversampling 10,
             2 power iterations, fixed-seed Gaussian sketch: deterministic) or "exact".
             B @ A is a LoRA pair: lora_B = B, lora_A = A, scaling 1.
             bands="float16:16,int8:32,int4:64": Delta-CoMe-style mixed precision per
             singular-value band (see encode_lowrank).
    masks    (K fine-tunes of one base at once; input [K, *shape]) merged.<field> (the
             merged vector tau_m in codec `merged_codec`), masks uint8 [K, ceil(n/8)],
             lambdas fp32 [K]; task i = lambda_i * (m_i (.) tau_m).
             mode "emr" (EMR-merging): tau_m = elect(sign of sum_i tau_i) * max over the
             agreeing |tau_i|; m_i = (tau_i * tau_m > 0); lambda_i = sum|tau_i| / sum|m_i tau_m|.
             mode "tall" (TALL-masks): tau_m = sum_i tau_i; m_i = |tau_i| >= lam_t |tau_m - tau_i|;
             lambda_i = the least-squares scalar <tau_i, m_i tau_m> / ||m_i tau_m||^2 (TALL's
             paper scales tau_m by a tuned lambda instead; rescale="none" gives lambda_i = 1).
             The mask is computed against the *decoded* merged vector, so the codec's
             error is accounted for.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lfm_engine.io import dtypes as _dt
from lfm_engine.reference.merge import magnitude_mask, random_mask
from lfm_engine.reference.philox import stream_id

# the largest |value| of a code (nf4: its code book spans [-1, 1]); the keys are the
# group-quantizing codecs (scale per group of g along the input dim)
QMAX = {"int8": 127, "int4": 7, "int2": 1, "nf4": 1}
MSE_CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # scale_search="mse": fractions of absmax tried
BITS = {"int8": 8, "int4": 4, "int2": 2, "nf4": 4}
# The NF4 code book of QLoRA (Dettmers et al., 2023): 16 levels in [-1, 1] placed at
# normal quantiles, 8 on the positive side, 7 on the negative side and an exact 0 (code 7).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982985305786, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) * 0.5  # float32, as the C++ encoder computes them
NF4_ZERO = 7
# the dtypes a codec's scales may be stored in (names and torch types: lfm_engine/io/dtypes.py)
SCALE_DTYPES = {d.name: d.torch for d in (_dt.FLOAT16, _dt.FLOAT32, _dt.BFLOAT16)}


class CodecError(ValueError):
    """Bad input for a codec (shape, dtype, NaN, option out of range, inconsistent fields)."""


# ---------------------------------------------------------------------------
# helpers


def matrix_shape(shape) -> tuple[int, int]:
    """(rows, cols) of the codec's matrix view of a tensor of `shape` (module docstring)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    rows, cols = matrix_shape(delta.shape)
    return delta.reshape(rows, cols)


def check_delta(delta: torch.Tensor, what: str = "delta") -> torch.Tensor:
    """float32 copy-free view of a finite float tensor, or CodecError naming the problem."""
    if not isinstance(delta, torch.Tensor):
        raise CodecError(f"{what} must be a torch.Tensor, got {type(delta).__name__}")
    if not delta.dtype.is_floating_point:
        raise CodecError(f"{what} has dtype {delta.dtype}; codecs take float32/float16/bfloat16")
    d = delta.detach().to(torch.float32)
    if d.numel() and not bool(torch.isfinite(d).all()):
        bad = int((~torch.isfinite(d)).reshape(-1).nonzero()[0])
        raise CodecError(f"{what} holds NaN or Inf (first at flat index {bad})")
    return d.contiguous()


def _scale_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        name = str(name).replace("torch.", "")
    if name not in SCALE_DTYPES:
        raise CodecError(f"scale_dtype '{name}' is not one of {', '.join(SCALE_DTYPES)}")
    return SCALE_DTYPES[name]


def _round_scale(s: torch.Tensor, dt: torch.dtype, what: str) -> torch.Tensor:
    r = s.to(dt)
    if not bool(torch.isfinite(r).all()):
        raise CodecError(f"{what}: a scale overflows {dt} (|delta| too large); use scale_dtype='float32'")
    return r


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> uint8 [..., ceil(n/8)], element j at bit j % 8 of byte j // 8."""
    n = bits.shape[-1]
    nb = (n + 7) // 8
    pad = nb * 8 - n
    b = bits.to(torch.uint8)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], nb, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (b * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., nb] -> bool [..., n] (inverse of pack_bits)."""
    shifts = torch.arange(8, dtype=torch.int32)
    b = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n].to(torch.bool)


def pack_bits32(bits: torch.Tensor) -> torch.Tensor:
    """bool [rows, n] -> uint32 [rows, ceil(n/32)], element j at bit j % 32 of word j // 32."""
    rows, n = bits.shape
    nw = (n + 31) // 32
    b = torch.nn.functional.pad(bits.to(torch.int64), (0, nw * 32 - n)).reshape(rows, nw, 32)
    w = (b << torch.arange(32, dtype=torch.int64)).sum(dim=-1)
    # torch has no uint32 arithmetic on the CPU: go through int32 with wrap-around.
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return w.view(torch.uint32)


def unpack_bits32(words: torch.Tensor, n: int) -> torch.Tensor:
    """uint32 [rows, nw] -> bool [rows, n]."""
    w = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = (w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1
    return b.reshape(words.shape[0], -1)[:, :n].to(torch.bool)


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int [..., n] in two's complement range -> uint8 [..., ceil(n*bits/8)], little-end first."""
    per = 8 // bits
    n = q.shape[-1]
    nb = (n + per - 1) // per
    u = (q.to(torch.int32) & ((1 << bits) - 1))
    u = torch.nn.functional.pad(u, (0, nb * per - n)).reshape(*q.shape[:-1], nb, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (u << shifts).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., nb] -> int8 [..., n] (sign-extended two's complement)."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    u = u.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]
    half = 1 << (bits - 1)
    return torch.where(u >= half, u - (1 << bits), u).to(torch.int8)


def _need(fields: dict, name: str, dtype: torch.dtype, shape: tuple, codec: str) -> torch.Tensor:
    """Field `name` with exactly this dtype and shape, else CodecError (corrupt/foreign data)."""
    if name not in fields:
        raise CodecError(f"{codec}: field '{name}' is missing (have: {', '.join(sorted(fields)) or 'none'})")
    t = fields[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise CodecError(f"{codec}: field '{name}' is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


# ---------------------------------------------------------------------------
# sign1


def encode_sign1(delta: torch.Tensor, *, per_tensor: bool = False, scale_dtype="float16") -> tuple[dict, dict]:
    d = as_matrix(check_delta(delta))
    sdt = _scale_dtype(scale_dtype)
    absd = d.abs().to(torch.float64)
    if per_tensor:
        s = absd.mean().reshape(1) if d.numel() else torch.zeros(1, dtype=torch.float64)
    else:
        s = absd.mean(dim=1) if d.shape[1] else torch.zeros(d.shape[0], dtype=torch.float64)
    scales = _round_scale(s.to(torch.float32), sdt, "sign1")
    signs = pack_bits32(d < 0)
    return {"signs": signs, "scales": scales}, {"per_tensor": bool(per_tensor),
                                                 "scale_dtype": str(sdt).replace("torch.", "")}


def decode_sign1(fields: dict, shape, meta: dict) -> torch.Tensor:
    rows, cols = matrix_shape(shape)
    sdt = _scale_dtype(meta.get("scale_dtype", "float16"))
    signs = _need(fields, "signs", torch.uint32, (rows, (cols + 31) // 32), "sign1")
    scales = _need(fields, "scales", sdt, (1,) if meta.get("per_tensor") else (rows,), "sign1")
    neg = unpack_bits32(signs, cols)
    s = scales.to(torch.float32).reshape(-1, 1)
    return torch.where(neg, -s, s).expand(rows, cols).reshape(shape).contiguous()


# ---------------------------------------------------------------------------
# int8 / int4 / int2, group-wise along cols


def _codes(v: torch.Tensor, qmax: int, nf4: bool) -> torch.Tensor:
    """Codes of v = delta / s: clamp(round_half_even(v), -qmax, qmax), or NF4's nearest level."""
    if nf4:
        return torch.bucketize(v, NF4_MIDPOINTS)  # #{j : v > midpoint j}
    return torch.round(v).clamp_(-qmax, qmax)


def _values(q: torch.Tensor, nf4: bool) -> torch.Tensor:
    """float32 value of each code: q itself, or the NF4 code book entry."""
    return NF4_LEVELS[q.long()] if nf4 else q.to(torch.float32)


def _quantize_groups(d: torch.Tensor, qmax: int, g: int, sdt: torch.dtype, what: str, scale_search: str = "absmax",
                     nf4: bool = False):
    """d [rows, cols] float32 -> (q int32 [rows, cols], scales sdt [rows, ceil(cols/g)]).

    scale_search "absmax": s = absmax / qmax (the spec's scale; nothing is clipped).
    "mse": s = c * absmax / qmax for the c in MSE_CLIP_GRID (1.0, 0.95, ..., 0.5) whose
    rounded scale gives the smallest group error sum (value(q)*s - d)^2 (ties: the larger
    c), the HQQ/AWQ-style clip search; the few largest entries are then clipped to the
    largest level. The decoder is the same for both (value(q) * s). nf4: q are NF4 codes
    (qmax = 1), 7 (zero) where s == 0.
    """
    rows, cols = d.shape
    ng = (cols + g - 1) // g
    padded = torch.nn.functional.pad(d, (0, ng * g - cols)).reshape(rows, ng, g)
    absmax = padded.abs().amax(dim=-1) if cols else torch.zeros(rows, 0)
    if scale_search not in ("absmax", "mse"):
        raise CodecError(f"{what}: scale_search must be 'absmax' or 'mse', got {scale_search!r}")
    grid = (1.0,) if scale_search == "absmax" else MSE_CLIP_GRID
    scales, best = None, None
    for c in grid:
        cand = _round_scale(absmax * c / float(qmax), sdt, what)
        if len(grid) == 1:
            scales = cand
            break
        s = cand.to(torch.float32).unsqueeze(-1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        err = (_values(_codes(padded / safe, qmax, nf4), nf4) * s - padded).square().sum(-1)
        if best is None:
            scales, best = cand, err
        else:
            better = err < best
            scales = torch.where(better, cand, scales)
            best = torch.where(better, err, best)
    s = scales.to(torch.float32).unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = _codes(padded / safe, qmax, nf4)
    q = torch.where(s > 0, q, torch.full_like(q, NF4_ZERO if nf4 else 0))
    return q.reshape(rows, ng * g)[:, :cols].to(torch.int32), scales


def _dequantize_groups(q: torch.Tensor, scales: torch.Tensor, g: int, nf4: bool = False) -> torch.Tensor:
    rows, cols = q.shape
    s = scales.to(torch.float32).repeat_interleave(g, dim=1)[:, :cols]
    return _values(q, nf4) * s


def _check_group(group_size) -> int:
    g = int(group_size)
    if g <= 0:
        raise CodecError(f"group_size must be >= 1, got {group_size}")
    return g


def encode_int(delta: torch.Tensor, codec: str, *, group_size: int = 128, scale_dtype="float16",
               scale_search: str = "absmax") -> tuple[dict, dict]:
    """scale_search: "absmax" (the spec's scale) or "mse" (clip search, see _quantize_groups)."""
    if codec not in QMAX:
        raise CodecError(f"unknown integer codec '{codec}'")
    g = _check_group(group_size)
    sdt = _scale_dtype(scale_dtype)
    d = as_matrix(check_delta(delta))
    q, scales = _quantize_groups(d, QMAX[codec], g, sdt, codec, scale_search, nf4=codec == "nf4")
    meta = {"group_size": g, "scale_dtype": str(sdt).replace("torch.", "")}
    if codec == "int8":
        return {"q": q.to(torch.int8), "scales": scales}, meta
    return {"packed": pack_int(q, BITS[codec]), "scales": scales}, meta


def decode_int(fields: dict, shape, meta: dict, codec: str) -> torch.Tensor:
    rows, cols = matrix_shape(shape)
    g = _check_group(meta.get("group_size", 128))
    sdt = _scale_dtype(meta.get("scale_dtype", "float16"))
    scales = _need(fields, "scales", sdt, (rows, (cols + g - 1) // g), codec)
    if codec == "int8":
        q = _need(fields, "q", torch.int8, (rows, cols), codec)
    else:
        per = 8 // BITS[codec]
        packed = _need(fields, "packed", torch.uint8, (rows, (cols + per - 1) // per), codec)
        q = unpack_int(packed, BITS[codec], cols)
        if codec == "nf4":
            q = q.to(torch.int32) & 15  # unsigned codes
    return _dequantize_groups(q, scales, g, nf4=codec == "nf4").reshape(shape)


# ---------------------------------------------------------------------------
# ternary and sparse_int


def _check_density(density) -> float:
    d = float(density)
    if not (0.0 < d <= 1.0):
        raise CodecError(f"density must lie in (0, 1], got {density}")
    return d


def encode_ternary(delta: torch.Tensor, *, density: float = 0.1) -> tuple[dict, dict]:
    dens = _check_density(density)
    d = check_delta(delta).reshape(-1)
    keep = magnitude_mask(d, dens) if d.numel() else torch.zeros(0, dtype=torch.bool)
    kept = d[keep]
    alpha = kept.abs().to(torch.float64).mean().to(torch.float32).reshape(1) if kept.numel() else torch.zeros(1)
    return ({"mask": pack_bits(keep), "signs": pack_bits(kept < 0), "alpha": alpha},
            {"density": dens, "kept": int(keep.sum())})


def _decode_mask(fields, n, codec):
    mask = unpack_bits(_need(fields, "mask", torch.uint8, ((n + 7) // 8,), codec), n)
    return mask, int(mask.sum())


def decode_ternary(fields: dict, shape, meta: dict) -> torch.Tensor:
    n = math.prod(shape)
    mask, k = _decode_mask(fields, n, "ternary")
    signs = unpack_bits(_need(fields, "signs", torch.uint8, ((k + 7) // 8,), "ternary"), k)
    alpha = _need(fields, "alpha", torch.float32, (1,), "ternary")[0]
    out = torch.zeros(n, dtype=torch.float32)
    out[mask] = torch.where(signs, -alpha, alpha)
    return out.reshape(shape)


def encode_sparse_int(delta: torch.Tensor, *, density: float = 0.1, bits: int = 8, group_size: int = 128,
                      method: str = "magnitude", seed: int = 0, name: str = "", scale_dtype="float16"
                      ) -> tuple[dict, dict]:
    dens = _check_density(density)
    if int(bits) not in (8, 4):
        raise CodecError(f"sparse_int: bits must be 8 or 4, got {bits}")
    bits = int(bits)
    g = _check_group(group_size)
    sdt = _scale_dtype(scale_dtype)
    d = check_delta(delta).reshape(-1)
    if method == "magnitude":
        keep = magnitude_mask(d, dens) if d.numel() else torch.zeros(0, dtype=torch.bool)
        vals = d[keep]
    elif method == "dare":
        keep = random_mask((d.numel(),), dens, int(seed), stream_id(name, 0))
        vals = d[keep] / dens  # DARE's unbiased rescale of the survivors
    else:
        raise CodecError(f"sparse_int: method must be 'magnitude' or 'dare', got '{method}'")
    qmax = 127 if bits == 8 else 7
    q, scales = _quantize_groups(vals.reshape(1, -1), qmax, g, sdt, "sparse_int")
    q, scales = q.reshape(-1), scales.reshape(-1)
    fields = {"mask": pack_bits(keep), "scales": scales,
              "q": q.to(torch.int8) if bits == 8 else pack_int(q, 4)}
    return fields, {"density": dens, "bits": bits, "group_size": g, "method": method, "seed": int(seed),
                    "name": name, "kept": int(keep.sum()), "scale_dtype": str(sdt).replace("torch.", "")}


def decode_sparse_int(fields: dict, shape, meta: dict) -> torch.Tensor:
    n = math.prod(shape)
    bits = int(meta.get("bits", 8))
    g = _check_group(meta.get("group_size", 128))
    sdt = _scale_dtype(meta.get("scale_dtype", "float16"))
    mask, k = _decode_mask(fields, n, "sparse_int")
    scales = _need(fields, "scales", sdt, ((k + g - 1) // g,), "sparse_int")
    if bits == 8:
        q = _need(fields, "q", torch.int8, (k,), "sparse_int")
    else:
        q = unpack_int(_need(fields, "q", torch.uint8, ((k + 1) // 2,), "sparse_int"), 4, k)
    vals = _dequantize_groups(q.reshape(1, -1), scales.reshape(1, -1), g).reshape(-1)
    out = torch.zeros(n, dtype=torch.float32)
    out[mask] = vals
    return out.reshape(shape)


# ---------------------------------------------------------------------------
# lowrank


def _rank_for_energy(s: torch.Tensor, total: float, energy: float) -> Optional[int]:
    """Smallest r with sum_{i<r} s_i^2 >= energy * total, or None if s is too short."""
    if total <= 0:
        return 0
    cum = torch.cumsum(s.to(torch.float64) ** 2, 0)
    hit = (cum >= energy * total * (1 - 1e-12)).nonzero()
    return int(hit[0]) + 1 if hit.numel() else None


def randomized_svd(a: torch.Tensor, k: int, n_iter: int = 2, oversample: int = 10, seed: int = 0):
    """Top-k (U, S, Vh) of a [m, n] float32 matrix by a randomized range finder
    (Halko et al.): Y = A Omega, n_iter power iterations with QR re-orthonormalisation,
    then the exact SVD of the small Q^T A. Omega comes from a fixed-seed generator so the
    result is deterministic."""
    m, n = a.shape
    kk = min(min(m, n), k + oversample)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, kk, generator=gen, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    u_s, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_s)[:, :k], s[:k], vh[:k]


def parse_bands(bands) -> list:
    """"float16:16,int8:32,int4:64" (or with '+' between bands, as the CLI's codec spec
    needs: lowrank:bands=float16:16+int8:32) or [("float16", 16), ...] -> [(kind, width)]."""
    if isinstance(bands, str):
        out = []
        for part in filter(None, (p.strip() for p in bands.replace("+", ",").split(","))):
            kind, _, width = part.partition(":")
            try:
                out.append((kind.strip(), int(width)))
            except ValueError:
                raise CodecError(f"lowrank: bad band '{part}' (use KIND:WIDTH, e.g. int8:32)") from None
        bands = out
    res = []
    for kind, width in bands:
        if kind not in ("float16", "bfloat16", "float32", "int8", "int4", "int2") or int(width) < 1:
            raise CodecError(f"lowrank: bad band ({kind}, {width}); kinds float16/bfloat16/float32/int8/int4/int2")
        res.append((kind, int(width)))
    if not res:
        raise CodecError("lowrank: bands is empty")
    return res


def encode_lowrank(delta: torch.Tensor, *, rank: Optional[int] = None, energy: Optional[float] = None,
                   method: str = "randomized", factor_dtype="float16", n_iter: int = 2, bands=None,
                   band_group_size: int = 64) -> tuple[dict, dict]:
    """rank and energy: give at most one; neither = rank 64 (capped at min(rows, cols)).

    bands (Delta-CoMe-style mixed precision): "float16:16,int8:32,int4:64" stores the first
    16 singular directions as fp16 factors, the next 32 with int8 and the next 64 with
    int4 group-wise factors (groups of band_group_size along each factor's long dim:
    A_k [w, cols] row-wise, B_k^T [w, rows] row-wise). The rank is the bands' total width
    (capped at min(rows, cols)); rank/energy must not be given with bands.
    Fields: band{k}.A / band{k}.B (float bands) or band{k}.A.<f> / band{k}.Bt.<f> (int bands).
    """
    if bands is not None:
        if rank is not None or energy is not None:
            raise CodecError("lowrank: give bands or rank/energy, not both")
        bl = parse_bands(bands)
        fields, meta = encode_lowrank(delta, rank=sum(w for _, w in bl), method=method, factor_dtype="float32",
                                      n_iter=n_iter)
        a, b = fields["A"], fields["B"]
        r = meta["rank"]
        out, used, start = {}, [], 0
        for k, (kind, width) in enumerate(bl):
            if start >= r:
                break
            w = min(width, r - start)
            ak, bk = a[start:start + w], b[:, start:start + w]
            if kind in QMAX:
                fa, _ = encode_int(ak, kind, group_size=band_group_size)
                fb, _ = encode_int(bk.T.contiguous(), kind, group_size=band_group_size)
                out.update({f"band{k}.A.{n}": t for n, t in fa.items()})
                out.update({f"band{k}.Bt.{n}": t for n, t in fb.items()})
            else:
                dt = SCALE_DTYPES[kind]
                out[f"band{k}.A"], out[f"band{k}.B"] = ak.to(dt).contiguous(), bk.to(dt).contiguous()
            used.append([kind, w])
            start += w
        return out, {"rank": r, "method": method, "bands": used, "band_group_size": int(band_group_size)}
    if rank is not None and energy is not None:
        raise CodecError("lowrank: give either rank or energy, not both")
    if method not in ("randomized", "exact"):
        raise CodecError(f"lowrank: method must be 'randomized' or 'exact', got '{method}'")
    fdt = _scale_dtype(factor_dtype)
    d = as_matrix(check_delta(delta))
    m, n = d.shape
    full = min(m, n)
    if energy is not None:
        e = float(energy)
        if not (0.0 < e <= 1.0):
            raise CodecError(f"lowrank: energy must lie in (0, 1], got {energy}")
    else:
        r = 64 if rank is None else int(rank)
        if r < 0:
            raise CodecError(f"lowrank: rank must be >= 0, got {rank}")
        r = min(r, full)
    total = float((d.to(torch.float64) ** 2).sum())
    if method == "exact" or full <= 64:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        if energy is not None:
            r = _rank_for_energy(s, total, e) or full
    elif energy is None:
        u, s, vh = randomized_svd(d, r, n_iter=n_iter)
    else:
        k = 32
        while True:
            u, s, vh = randomized_svd(d, k, n_iter=n_iter)
            r = _rank_for_energy(s, total, e)
            if r is not None:
                break
            if 2 * k >= full:  # the sketch would cost as much as the exact SVD
                u, s, vh = torch.linalg.svd(d, full_matrices=False)
                r = _rank_for_energy(s, total, e) or full
                break
            k *= 2
    root = s[:r].clamp_min(0).sqrt()
    b = (u[:, :r] * root).to(fdt)
    a = (root.unsqueeze(1) * vh[:r]).to(fdt)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise CodecError(f"lowrank: a factor overflows {fdt}; use factor_dtype='float32'")
    return {"A": a.contiguous(), "B": b.contiguous()}, {"rank": int(r), "method": method,
                                                        "factor_dtype": str(fdt).replace("torch.", "")}


def decode_lowrank(fields: dict, shape, meta: dict) -> torch.Tensor:
    rows, cols = matrix_shape(shape)
    r = int(meta["rank"])
    if meta.get("bands") is not None:
        g = int(meta.get("band_group_size", 64))
        out = torch.zeros(rows, cols)
        for k, (kind, w) in enumerate(meta["bands"]):
            if kind in QMAX:
                pick = lambda pre: {n[len(pre):]: t for n, t in fields.items() if n.startswith(pre)}  # noqa: E731
                ak = decode_int(pick(f"band{k}.A."), (w, cols), {"group_size": g}, kind)
                bk = decode_int(pick(f"band{k}.Bt."), (w, rows), {"group_size": g}, kind).T
            else:
                dt = SCALE_DTYPES[kind]
                ak = _need(fields, f"band{k}.A", dt, (w, cols), "lowrank").to(torch.float32)
                bk = _need(fields, f"band{k}.B", dt, (rows, w), "lowrank").to(torch.float32)
            out += bk @ ak
        return out.reshape(shape)
    fdt = _scale_dtype(meta.get("factor_dtype", "float16"))
    a = _need(fields, "A", fdt, (r, cols), "lowrank").to(torch.float32)
    b = _need(fields, "B", fdt, (rows, r), "lowrank").to(torch.float32)
    return (b @ a).reshape(shape)


# ---------------------------------------------------------------------------
# masks (K fine-tunes of one base)


def encode_masks(deltas: torch.Tensor, *, mode: str = "emr", merged_codec: str = "int8",
                 merged_options: Optional[dict] = None, tall_lambda: float = 0.4,
                 rescale: Optional[str] = None) -> tuple[dict, dict]:
    """deltas [K, *shape] -> fields merged.<f>, masks [K, ceil(n/8)], lambdas [K]."""
    t = check_delta(deltas, "deltas")
    if t.ndim < 1 or t.shape[0] < 1:
        raise CodecError("masks: deltas must be a stack [K, *shape] with K >= 1")
    if merged_codec == "masks":
        raise CodecError("masks: merged_codec cannot be 'masks'")
    K = t.shape[0]
    shape = tuple(t.shape[1:])
    flat = t.reshape(K, -1)
    if mode == "emr":
        elect = torch.sign(flat.sum(0))
        agree = (torch.sign(flat) == elect) & (elect != 0)
        tau = elect * torch.where(agree, flat.abs(), torch.zeros_like(flat)).amax(0)
        rescale = rescale or "emr"
    elif mode == "tall":
        tau = flat.sum(0)
        rescale = rescale or "lsq"
    else:
        raise CodecError(f"masks: mode must be 'emr' or 'tall', got '{mode}'")
    if rescale not in ("emr", "lsq", "none"):
        raise CodecError(f"masks: rescale must be 'emr', 'lsq' or 'none', got '{rescale}'")
    mf, mmeta = encode(tau.reshape(shape), merged_codec, **(merged_options or {}))
    tau_hat = decode(mf, shape, merged_codec, mmeta).reshape(-1)
    if mode == "emr":
        masks = flat * tau_hat > 0
    else:
        masks = flat.abs() >= float(tall_lambda) * (tau_hat - flat).abs()
    kept = torch.where(masks, tau_hat, torch.zeros_like(flat)).to(torch.float64)
    lambdas = torch.ones(K, dtype=torch.float64)
    if rescale == "emr":
        den = kept.abs().sum(1)
        lambdas = torch.where(den > 0, flat.abs().to(torch.float64).sum(1) / den.clamp_min(1e-300), lambdas)
    elif rescale == "lsq":
        den = (kept ** 2).sum(1)
        lambdas = torch.where(den > 0, (kept * flat.to(torch.float64)).sum(1) / den.clamp_min(1e-300), lambdas)
    fields = {f"merged.{k}": v for k, v in mf.items()}
    fields["masks"] = pack_bits(masks)
    fields["lambdas"] = lambdas.to(torch.float32)
    return fields, {"tasks": K, "mode": mode, "rescale": rescale, "merged_codec": merged_codec,
                    "merged_meta": mmeta, "tall_lambda": float(tall_lambda)}


def decode_masks(fields: dict, shape, meta: dict, task: Optional[int] = None) -> torch.Tensor:
    K = int(meta["tasks"])
    n = math.prod(shape)
    mf = {k[len("merged."):]: v for k, v in fields.items() if k.startswith("merged.")}
    tau = decode(mf, shape, meta["merged_codec"], meta["merged_meta"]).reshape(-1)
    masks = unpack_bits(_need(fields, "masks", torch.uint8, (K, (n + 7) // 8), "masks"), n)
    lambdas = _need(fields, "lambdas", torch.float32, (K,), "masks")
    if task is not None:
        if not 0 <= int(task) < K:
            raise CodecError(f"masks: task {task} out of range [0, {K})")
        i = int(task)
        return (lambdas[i] * torch.where(masks[i], tau, torch.zeros_like(tau))).reshape(shape)
    out = lambdas.unsqueeze(1) * torch.where(masks, tau, torch.zeros_like(tau))
    return out.reshape(K, *shape)


# ---------------------------------------------------------------------------
# dispatch by codec name

CODECS = ("sign1", "int8", "int4", "int2", "nf4", "ternary", "sparse_int", "lowrank", "masks")


def encode(delta: torch.Tensor, codec: str, **options) -> tuple[dict, dict]:
    """(fields, meta) of `delta` under `codec` (see the module docstring)."""
    if codec == "sign1":
        return encode_sign1(delta, **options)
    if codec in QMAX:
        return encode_int(delta, codec, **options)
    if codec == "ternary":
        return encode_ternary(delta, **options)
    if codec == "sparse_int":
        return encode_sparse_int(delta, **options)
    if codec == "lowrank":
        return encode_lowrank(delta, **options)
    if codec == "masks":
        return encode_masks(delta, **options)
    raise CodecError(f"unknown codec '{codec}' (known: {', '.join(CODECS)})")


def decode(fields: dict, shape, codec: str, meta: dict, task: Optional[int] = None) -> torch.Tensor:
    """float32 delta of `shape` (masks: [K, *shape], or one task) from the fields."""
    shape = tuple(int(s) for s in shape)
    if codec == "sign1":
        return decode_sign1(fields, shape, meta)
    if codec in QMAX:
        return decode_int(fields, shape, meta, codec)
    if codec == "ternary":
        return decode_ternary(fields, shape, meta)
    if codec == "sparse_int":
        return decode_sparse_int(fields, shape, meta)
    if codec == "lowrank":
        return decode_lowrank(fields, shape, meta)
    if codec == "masks":
        return decode_masks(fields, shape, meta, task)
    raise CodecError(f"unknown codec '{codec}' (known: {', '.join(CODECS)})")


def decode_add_reference(base: torch.Tensor, fields: dict, codec: str, meta: dict, alpha: float = 1.0,
                         out_dtype=None) -> torch.Tensor:
    """x_hat = base + alpha * decode(delta), float32 arithmetic, one rounding to out_dtype."""
    d = decode(fields, tuple(base.shape), codec, meta)
    r = base.to(torch.float32) + (d if alpha == 1.0 else float(alpha) * d)
    return r.to(out_dtype or base.dtype)


def delta_apply_reference(x: torch.Tensor, deltas: list, token_slot: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y[t] += x[t] @ decode(deltas[slot[t]])^T (slot < 0: no delta), via decode-then-matmul.

    x [T, in], deltas: list of (fields, shape [out, in], codec, meta), y [T, out] (updated in place)."""
    acc = y.to(torch.float32)
    for s, (fields, shape, codec, meta) in enumerate(deltas):
        rows = (token_slot == s).nonzero().reshape(-1)
        if rows.numel() == 0:
            continue
        w = decode(fields, shape, codec, meta).reshape(shape[0], -1)
        acc[rows] += x[rows].to(torch.float32) @ w.T
    y.copy_(acc.to(y.dtype))
    return y
