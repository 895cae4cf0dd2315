"""
The three token operations of a packed JEPA batch, each behind one function that picks its path.

A JEPA batch is ragged: every clip keeps a different number of context tokens. Instead of
truncating to the batch minimum (as V-JEPA does) or padding, we *pack* the kept tokens of all
clips into one [total, D] tensor and describe the clips by `cu_seqlens`, the int32 prefix sum
of their lengths (the flash_attn_varlen convention):

    lengths    = [3, 1, 4]
    cu_seqlens = [0, 3, 4, 8]   # clip i owns rows cu_seqlens[i]:cu_seqlens[i+1]

attention(q, k, v, cu_seqlens, max_seqlen)  non-causal attention inside each clip only
gather(x, index, pos=None)                  rows x[index] (+ pos[index % len(pos)])
scatter(x, index, n)                        the inverse: an [n, D] tensor with x placed at index

Each has a plain PyTorch reference (`*_torch`), which is the specification, and right below it
the Triton kernel (CUDA) that must equal it. Under TRITON_INTERPRET=1 the kernels also run on
the CPU (slowly), which is how the tests check them on a machine without a GPU.

torch.compile sees each Triton kernel as one operator: they are registered as custom ops
(torch.library), each with a fake version that only says the output's shape (what tracing needs) and
its backward beside it. The references are plain torch that it traces into. So a compiled step has
no graph break at them.
"""
import math
import os
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


try:
    import triton
    import triton.language as tl
# no Triton (e.g. macOS): the references still work, the kernels are never launched
except ImportError:
    class _NoTriton:
        jit = staticmethod(lambda fn: fn)
        constexpr = None
    triton = tl = _NoTriton
    HAS_TRITON = False
else:
    HAS_TRITON = True

# "auto": the fast path where it exists (CUDA) and was measured faster, the reference elsewhere. Tests
# set "torch" or "triton".
BACKEND = "auto"
# tests set this: kernel outputs start as NaN instead of uninitialised memory, so a skipped tile shows
POISON = False
# the interpreter runs one program at a time through numpy: small tiles keep the tests fast
# and make tiny shapes span several tiles
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(*tensors):
    if BACKEND == "torch":
        return False
    if BACKEND == "triton":
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def _empty(*shape, like, dtype=None):
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _unit_stride(x):
    """The kernels index rows by stride but need the last dimension contiguous (vector loads)."""
    return x if x.stride(-1) == 1 else x.contiguous()


# -----------------------------------------------------------------------------
# Packed sequences: the rows of several segments (clips, or one sense of a clip) in one flat tensor

def segment_ids(cu_seqlens, total):
    """The segment of each packed row: cu_seqlens [0, 3, 5] -> [0, 0, 0, 1, 1]. total =
    cu_seqlens[-1], passed in because reading it from the device would wait for the device."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                   output_size=total)


class Packed(NamedTuple):
    """Rows of several segments in one flat sequence, the way variable-length attention takes them:
    segments of 3 and 2 rows have cu = [0, 3, 5] and max_len = 3. Nothing is padded or cut."""
    index: torch.Tensor   # [total] int64: rows of the flattened [B * N] tokens, segment by segment
    cu: torch.Tensor      # [S + 1] int32 cu_seqlens: segment s is rows cu[s]:cu[s + 1]
    max_len: int          # the longest segment, a Python int: nobody has to ask the device

    def to(self, device):
        """On the device without waiting: a host tensor bound for a GPU goes through page-locked
        memory."""
        pin = torch.device(device).type == "cuda" and self.index.device.type == "cpu"
        index, cu = (x.pin_memory() if pin else x for x in (self.index, self.cu))
        return Packed(index.to(device, non_blocking=pin), cu.to(device, non_blocking=pin),
                      self.max_len)

    def segment_ids(self):
        """[total]: the segment of each row."""
        return segment_ids(self.cu, len(self.index))


def pack(lists, n_tokens, batch, split_at=None):
    """Token lists (numbers within a clip) of segments s = (config s // batch, clip s % batch) ->
    Packed rows of the flattened [batch * n_tokens] tokens. split_at=nv also cuts each sorted list
    where its audio starts: the same rows, attended as one segment per modality (empty pieces are
    dropped)."""
    index = np.concatenate([np.asarray(x, np.int64) + (s % batch) * n_tokens
                            for s, x in enumerate(lists)])
    if split_at is None:
        lengths = [len(x) for x in lists]
    else:
        lengths = [n for x in lists for n in (int(np.sum(x < split_at)),
                                              int(np.sum(x >= split_at))) if n]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return Packed(torch.from_numpy(index), torch.from_numpy(cu), max(lengths, default=0))

# -----------------------------------------------------------------------------
# Attention over packed variable-length sequences


def attention_torch(q, k, v, cu_seqlens, max_seqlen=None):
    """q, k, v: [total, H, hd] packed; cu_seqlens: int32 [B+1]. Returns [total, H, hd].
    Reference: pad every clip to max_seqlen (at least the longest), and mask the padding keys out.
    Given max_seqlen, nothing here reads the device: torch.compile traces it without a break."""
    total, H, hd = q.shape
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()                # [B]
    B = len(lengths)
    L = max_seqlen if max_seqlen is not None else int(lengths.max()) if B else 0
    # row r of the packed tensor sits at (clip, offset) in the padded one
    clip = segment_ids(cu_seqlens, total)                              # [total]
    offset = torch.arange(total, device=q.device) - cu_seqlens[:-1].long()[clip]
    # [total, H, hd] -> [B, H, L, hd]
    def pad(x):
        out = x.new_zeros(B, L, H, hd)
        out[clip, offset] = x
        return out.transpose(1, 2)
    keep = torch.arange(L, device=q.device)[None, :] < lengths[:, None]    # [B, L] real keys
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2)[clip, offset]                           # back to [total, H, hd]

# FlashAttention-2 on packed clips. Never materialise the [L, L] score matrix:
# - forward: a program owns BLOCK_M queries of one (clip, head) and sweeps that clip's keys in
#   tiles of BLOCK_N, keeping an online softmax: a running row max m, a running sum l of
#   exp(s - m) and an fp32 accumulator of exp(s - m) @ V, rescaled by exp(m_old - m_new) whenever
#   the max grows. O = acc / l, and it stores LSE = m + log(l) per row for the backward.
# - backward: with P = exp(S - LSE) recomputed tile by tile, dV = P^T dO, dP = dO V^T and
#   dS = P * (dP - Δ) where Δ = rowsum(O * dO) (a cheap preprocess; equals rowsum(P * dP)).
#   One kernel owns a key tile and sweeps the queries for dK = scale dS^T Q and dV; another owns
#   a query tile and sweeps the keys for dQ = scale dS K. No atomics, so it is deterministic.
# Scores live in base 2 (scale folded with log2(e), exp2 is the fast instruction), so the stored
# LSE is log2-based too. Tiles past a clip's end exit at once; rows past it are masked: keys by
# -inf scores, queries by not storing. Head dims pad to a power of two >= 16 (tl.dot's minimum).

# bench.py --tune tries tile configs by setting entries here: (kernel, row) -> (BLOCK_M, BLOCK_N, warps,
# stages) for attention, ("rows", D) -> (BLOCK_R, BLOCK_D) for gather/scatter. Empty in normal use.
TILE_OVERRIDE = {}


def _attn_config(hd_pad, kernel, elem_bytes=2):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and row size. Fixed (no autotune) so
    the module imports and runs without a driver, and varying clip lengths never re-tune."""
    row = max(64, hd_pad * elem_bytes // 2)  # fp32 rows count double: shared memory is the limit
    if (kernel, row) in TILE_OVERRIDE:
        return TILE_OVERRIDE[kernel, row]
    if INTERPRET:
        return 16, 16, 1, 1
    # H100 (sm_90). Row 64 (head dim 64 in bf16/fp16, every V-JEPA size): fwd and dkdv are the winners of
    # bench.py --tune (README); dq and the other rows compile without register spills (ptxas -v), untimed.
    table = {
        "fwd":  {64: (64, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2),
                 512: (32, 32, 4, 2)},
        "dkdv": {64: (32, 64, 4, 3), 128: (32, 64, 8, 3), 256: (32, 32, 8, 2), 512: (16, 32, 4, 2)},
        "dq":   {64: (128, 32, 8, 3), 128: (128, 32, 8, 3), 256: (32, 32, 4, 2),
                 512: (32, 32, 4, 2)},
    }[kernel]
    return table[row]


@triton.jit
def _clip_head(cu_seqlens, H):
    """The (clip, head) that program axis 1 owns: its head, its first packed row (int64: row *
    stride can pass 2^31) and its length."""
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    start = tl.load(cu_seqlens + b)
    return h, start.to(tl.int64), tl.load(cu_seqlens + b + 1) - start


@triton.jit
def _tile(P, rows, stride, offs_d, mask):
    """Rows `rows` of one head's [L, hd] slice at P, as a [len(rows), HD_PAD] tile: zeros where mask
    is False."""
    return tl.load(P + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(q, K, V, n, L, offs_d, d_mask, skt, svt, qk_scale):
    """Key rows n of the clip, their values, and the scores of queries q against them: q k^T in
    log2 units, -inf for rows past the clip's end."""
    kv_mask = (n < L)[:, None] & d_mask[None, :]
    k, v = _tile(K, n, skt, offs_d, kv_mask), _tile(V, n, svt, offs_d, kv_mask)
    return k, v, tl.where((n < L)[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, cu_seqlens, qk_scale, H, total,
                     sqt, sqh, skt, skh, svt, svh, sot, soh,
                     HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    h, row0, L = _clip_head(cu_seqlens, H)
    if pid_m * BLOCK_M >= L:  # the grid is sized for the longest clip
        return
    # this clip and head
    Q, K, V = Q + row0 * sqt + h * sqh, K + row0 * skt + h * skh, V + row0 * svt + h * svh
    O += row0 * sot + h * soh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HD_PAD)
    m_mask, d_mask = offs_m < L, offs_d < HD
    q = _tile(Q, offs_m, sqt, offs_d, m_mask[:, None] & d_mask[None, :])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        # s [BLOCK_M, BLOCK_N]
        k, v, s = _scores(q, K, V, start_n + offs_n, L, offs_d, d_mask, skt, svt, qk_scale)
        # finite: every tile has a real key
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)                                   # 0 on the first tile
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])           # accumulate in place
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + h * total + row0 + offs_m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, total, sot, soh, sdt, sdh,
                           HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ[h, r] = sum_d O[r, h, d] * dO[r, h, d] over all packed rows (clips do not matter here)."""
    pid_m, h = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD_PAD)
    mask = (offs_m < total)[:, None] & (offs_d < HD)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + rows * sot + h * soh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows * sdt + h * sdh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * total + offs_m, tl.sum(o * do, 1), mask=offs_m < total)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens, qk_scale, sm_scale, H, total,
                          sqt, sqh, skt, skh, svt, svh, sdt, sdh, sgt, sgh,
                          HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """One program owns BLOCK_N keys of one (clip, head); it sweeps the clip's queries. DK and DV
    share the strides sgt, sgh (both are fresh contiguous tensors)."""
    pid_n = tl.program_id(0)
    h, row0, L = _clip_head(cu_seqlens, H)
    if pid_n * BLOCK_N >= L:
        return
    # this clip and head
    Q, K, V = Q + row0 * sqt + h * sqh, K + row0 * skt + h * skh, V + row0 * svt + h * svh
    DO, DK, DV = DO + row0 * sdt + h * sdh, DK + row0 * sgt + h * sgh, DV + row0 * sgt + h * sgh
    LSE, DELTA = LSE + h * total + row0, DELTA + h * total + row0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD_PAD)
    d_mask = offs_d < HD
    kv_mask = (offs_n < L)[:, None] & d_mask[None, :]
    k = _tile(K, offs_n, skt, offs_d, kv_mask)
    v = _tile(V, offs_n, svt, offs_d, kv_mask)

    dk = tl.zeros([BLOCK_N, HD_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HD_PAD], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        m = start_m + offs_m
        m_mask = m < L
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = _tile(Q, m, sqt, offs_d, q_mask)
        do = _tile(DO, m, sdt, offs_d, q_mask)
        lse = tl.load(LSE + m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + m, mask=m_mask, other=0.0)
        # work transposed ([keys, queries]) so the results land in the key-major layout of dK, dV.
        # Padding queries need no mask: q = dO = LSE = Δ = 0 there, so pT = 1 and dsT = 0 add nothing.
        pT = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    tl.store(DK + offs_n[:, None] * sgt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + offs_n[:, None] * sgt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, qk_scale, sm_scale, H, total,
                        sqt, sqh, skt, skh, svt, svh, sdt, sdh, sgt, sgh,
                        HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """One program owns BLOCK_M queries of one (clip, head); it sweeps the clip's keys."""
    pid_m = tl.program_id(0)
    h, row0, L = _clip_head(cu_seqlens, H)
    if pid_m * BLOCK_M >= L:
        return
    # this clip and head
    Q, K, V = Q + row0 * sqt + h * sqh, K + row0 * skt + h * skh, V + row0 * svt + h * svh
    DO, DQ = DO + row0 * sdt + h * sdh, DQ + row0 * sgt + h * sgh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HD_PAD)
    m_mask, d_mask = offs_m < L, offs_d < HD
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = _tile(Q, offs_m, sqt, offs_d, q_mask)
    do = _tile(DO, offs_m, sdt, offs_d, q_mask)
    lse = tl.load(LSE + h * total + row0 + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + h * total + row0 + offs_m, mask=m_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        # padding keys are masked (-inf): exp2(0 - LSE) overflows for rows with very negative scores,
        # and inf * (k = 0) would be NaN
        k, v, s = _scores(q, K, V, start_n + offs_n, L, offs_d, d_mask, skt, svt, qk_scale)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(DQ + offs_m[:, None] * sgt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _rows_heads(x):
    return x.stride(0), x.stride(1)


def _attn_scales(hd):
    """(padded head dim, softmax scale, the same times log2(e)): one place, so that the backward
    recomputes exactly the scores whose log-sum-exp the forward stored."""
    sm_scale = 1.0 / math.sqrt(hd)
    # scores in base 2
    return max(16, triton.next_power_of_2(hd)), sm_scale, sm_scale * 1.4426950408889634


def _attention_fwd_triton(q, k, v, cu_seqlens, max_seqlen):
    """(out [total, H, hd], lse [H, total] fp32, the log2-sum-exp of each row's scores, for the
    backward)."""
    assert q.shape == k.shape == v.shape and q.dim() == 3, "q, k, v: [total, H, hd] each"
    assert q.dtype == k.dtype == v.dtype, "q, k, v: one dtype (tl.dot takes matching operands)"
    assert q.shape[2] <= 256, "head dims up to 256"
    assert (cu_seqlens.numel() - 1) * q.shape[1] < 65536, "B * H is the grid's second axis"
    # q, k, v may be strided views (e.g. unbound from one [total, 3, H, hd] tensor): no copy
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    total, H, hd = q.shape
    B = cu_seqlens.numel() - 1
    hd_pad, _, qk_scale = _attn_scales(hd)
    o = _empty(total, H, hd, like=q)
    lse = _empty(H, total, like=q, dtype=torch.float32)
    BM, BN, warps, stages = _attn_config(hd_pad, "fwd", q.element_size())
    _attn_fwd_kernel[(triton.cdiv(max_seqlen, BM), B * H)](
        q, k, v, o, lse, cu_seqlens, qk_scale, H, total,
        *_rows_heads(q), *_rows_heads(k), *_rows_heads(v), *_rows_heads(o),
        HD=hd, HD_PAD=hd_pad, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
    return o, lse


def _attention_bwd_triton(do, q, k, v, o, lse, cu_seqlens, max_seqlen):
    q, k, v, do = _unit_stride(q), _unit_stride(k), _unit_stride(v), _unit_stride(do)
    total, H, hd = q.shape
    B = cu_seqlens.numel() - 1
    hd_pad, sm_scale, qk_scale = _attn_scales(hd)
    delta = _empty(H, total, like=q, dtype=torch.float32)
    BM = 16 if INTERPRET else max(16, 2048 // hd_pad)
    _attn_bwd_delta_kernel[(triton.cdiv(total, BM), H)](
        o, do, delta, total, *_rows_heads(o), *_rows_heads(do), HD=hd, HD_PAD=hd_pad, BLOCK_M=BM)
    dq, dk, dv = (_empty(total, H, hd, like=q) for _ in range(3))
    strides = (*_rows_heads(q), *_rows_heads(k), *_rows_heads(v), *_rows_heads(do),
               *_rows_heads(dq))
    BM, BN, warps, stages = _attn_config(hd_pad, "dkdv", q.element_size())
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, BN), B * H)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, qk_scale, sm_scale, H, total, *strides,
        HD=hd, HD_PAD=hd_pad, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _attn_config(hd_pad, "dq", q.element_size())
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, BM), B * H)](
        q, k, v, do, lse, delta, dq, cu_seqlens, qk_scale, sm_scale, H, total, *strides,
        HD=hd, HD_PAD=hd_pad, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
    return dq, dk, dv


# Measured on an H100 (README, GPU figures): when every clip has the same length (whole clips, as the
# EMA target and the probes encode them) there is nothing ragged to skip, and cuDNN's attention is
# 1.15-1.22x faster than our kernel. Torch's own default there is FlashAttention-2, which ours beats.
_DENSE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                   SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]


def attention_dense(q, k, v, n_clips):
    """attention() when all n_clips packed clips have one length L: [total, H, hd] is [n_clips, L,
    H, hd], so plain SDPA does it without padding or masks; on CUDA cuDNN's kernel first, then
    torch's order."""
    def clips(x):
        return x.unflatten(0, (n_clips, -1)).transpose(1, 2)              # [B, H, L, hd], a view
    with sdpa_kernel(_DENSE_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(clips(q), clips(k), clips(v))
    return out.transpose(1, 2).flatten(0, 1)                              # [total, H, hd]


@torch.library.custom_op("avjepa::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path: (out [total, H, hd], lse [H, total]; the backward needs both)."""
    return _attention_fwd_triton(q, k, v, cu_seqlens, max_seqlen)


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("avjepa::attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor,
                           lse: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd_triton(do, q, k, v, out, lse, cu_seqlens, max_seqlen)


@_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.max_seqlen = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)


def _attention_grad(ctx, do, _):
    dq, dk, dv = _attention_backward_op(do, *ctx.saved_tensors, ctx.max_seqlen)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def attention(q, k, v, cu_seqlens, max_seqlen=None):
    """Non-causal softmax(q k^T / sqrt(hd)) v within each packed clip. max_seqlen must be at least
    the longest clip (it sizes the kernel grid); None computes it, at the cost of a device sync.
    The Triton path is one custom op; the others are plain torch, which torch.compile traces
    into."""
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    n_clips = cu_seqlens.numel() - 1
    # every clip as long as the longest: then, and only then, the lengths add up to max_seqlen x clips
    # (read on the host: no sync)
    if BACKEND == "auto" and n_clips * max_seqlen == q.shape[0]:
        return attention_dense(q, k, v, n_clips)
    if _use_triton(q, k, v):
        return _attention_op(q, k, v, cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous(), max_seqlen)[0]
    return attention_torch(q, k, v, cu_seqlens, max_seqlen)


# -----------------------------------------------------------------------------
# Masked-token gather and its inverse
# Row-tiled copies: a program moves BLOCK_R rows, BLOCK_D columns at a time (masked, so any D).
# Pure memory traffic: the napkin limit is bytes moved / ~3 TB/s on an H100.

def _rows_config(D):
    """(BLOCK_R, BLOCK_D): ~2k elements per program step, 16 B+ vector loads along D."""
    if ("rows", D) in TILE_OVERRIDE:
        return TILE_OVERRIDE["rows", D]
    if INTERPRET:
        return 4, min(32, triton.next_power_of_2(D))
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    return max(1, 2048 // BLOCK_D), BLOCK_D


def gather_torch(x, index, pos=None):
    """x: [M, D], index: int64 [K] -> [K, D] = x[index] (+ pos[index % P] with pos [P, D])."""
    out = x.index_select(0, index)
    if pos is not None:
        out = out + pos.index_select(0, index % pos.shape[0])
    return out


@triton.jit
def _rows_kernel(X, INDEX, POS, OUT, K, D, P, sx, spos, sout,
                 SCATTER: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Move K rows of width D, BLOCK_R per program: gather out[r] = x[index[r]] (+ pos[index[r] %
    P]), or scatter out[index[r]] = x[r]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < K
    index = tl.load(INDEX + rows, mask=r_mask, other=0).to(tl.int64)
    if SCATTER:
        src, dst = rows.to(tl.int64), index
    else:
        src, dst = index, rows.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (cols < D)[None, :]
        val = tl.load(X + src[:, None] * sx + cols[None, :], mask=mask).to(tl.float32)
        if HAS_POS:  # the positional add rides along instead of costing a second pass
            val += tl.load(POS + (index % P)[:, None] * spos + cols[None, :], mask=mask).to(tl.float32)
        tl.store(OUT + dst[:, None] * sout + cols[None, :], val.to(OUT.dtype.element_ty), mask=mask)


def _gather_rows(x, index, pos=None):
    x = _unit_stride(x)
    pos = None if pos is None else _unit_stride(pos)
    K, D = index.shape[0], x.shape[1]
    dtype = x.dtype if pos is None else torch.result_type(x, pos)
    out = _empty(K, D, like=x, dtype=dtype)
    if K == 0:
        return out
    BR, BD = _rows_config(D)
    _rows_kernel[(triton.cdiv(K, BR),)](
        x, index, x if pos is None else pos, out, K, D, 1 if pos is None else pos.shape[0],
        x.stride(0), 0 if pos is None else pos.stride(0), out.stride(0),
        SCATTER=False, HAS_POS=pos is not None, BLOCK_R=BR, BLOCK_D=BD)
    return out


@torch.library.custom_op("avjepa::gather_rows", mutates_args=())
def _gather_op(x: torch.Tensor, index: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return _gather_rows(x, index.contiguous(), pos)


@_gather_op.register_fake
def _(x, index, pos):
    return x.new_empty(index.shape[0], x.shape[1],
                       dtype=x.dtype if pos is None else torch.result_type(x, pos))


def _gather_setup(ctx, inputs, output):
    x, index, pos = inputs
    ctx.save_for_backward(index)
    pos_meta = None if pos is None else (pos.shape[0], pos.dtype)
    ctx.x_meta, ctx.pos_meta = (x.shape[0], x.dtype), pos_meta


def _gather_grad(ctx, grad):
    # a scatter-add: indices may repeat in general (and index % P always does for pos), so it uses
    # torch's index_add (atomics on CUDA) rather than a second hand-written kernel
    (index,) = ctx.saved_tensors
    dx = dpos = None
    if ctx.needs_input_grad[0]:
        M, dtype = ctx.x_meta
        dx = grad.new_zeros(M, grad.shape[1], dtype=dtype).index_add(0, index, grad.to(dtype))
    if ctx.pos_meta is not None and ctx.needs_input_grad[2]:
        P, dtype = ctx.pos_meta
        dpos = grad.new_zeros(P, grad.shape[1], dtype=dtype).index_add(0, index % P, grad.to(dtype))
    return dx, None, dpos


_gather_op.register_autograd(_gather_grad, setup_context=_gather_setup)


def scatter_torch(x, index, n):
    """x: [K, D], index: int64 [K] of distinct rows -> [n, D], zero where no row lands."""
    return x.new_zeros(n, x.shape[1]).index_copy(0, index, x)


@torch.library.custom_op("avjepa::scatter_rows", mutates_args=())
def _scatter_op(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    # rows land at distinct indices, so no atomics; the rows nobody writes are zero (a memset)
    x, index = _unit_stride(x), index.contiguous()
    K, D = x.shape
    out = x.new_zeros(n, D)
    if K:
        BR, BD = _rows_config(D)
        _rows_kernel[(triton.cdiv(K, BR),)](x, index, x, out, K, D, 1, x.stride(0), 0,
                                            out.stride(0),
                                            SCATTER=True, HAS_POS=False, BLOCK_R=BR, BLOCK_D=BD)
    return out


@_scatter_op.register_fake
def _(x, index, n):
    return x.new_empty(n, x.shape[1])


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_grad(ctx, grad):
    (index,) = ctx.saved_tensors
    return _gather_op(grad, index, None), None, None


_scatter_op.register_autograd(_scatter_grad, setup_context=_scatter_setup)


def gather(x, index, pos=None):
    # Measured on an H100 (README, GPU figures): a plain gather is faster through torch's index_select
    # than through our kernel, so "auto" sends only the fused gather + positions to Triton.
    if _use_triton(x, index) and (pos is not None or BACKEND == "triton"):
        return _gather_op(x, index, pos)
    return gather_torch(x, index, pos)


def scatter(x, index, n):
    if _use_triton(x, index):
        return _scatter_op(x, index, n)
    return scatter_torch(x, index, n)
