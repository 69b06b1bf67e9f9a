"""Triton kernels of ``rewrite::flash_attention`` (FlashAttention-2 style forward and backward).

Forward: one program per (query tile of BLOCK_M rows, query head, batch). It streams key/value tiles of
BLOCK_N rows with an online softmax in base 2 (scores are pre-multiplied by log2(e)), keeps fp32 running
max / sum / accumulator, and saves the natural-log logsumexp per row for the backward.

Backward (recompute, no [N, N] tensor is stored):
  1. ``_flash_bwd_preprocess``: delta[i] = rowsum(dO[i] * O[i]) (fp32);
  2. ``_flash_bwd_dkdv``: one program per (key tile, key/value head, batch); it loops over the query heads of
     its GQA group and the query tiles, recomputes P = exp(S - lse) and accumulates dK, dV in fp32 (no atomics);
  3. ``_flash_bwd_dq``: one program per (query tile, query head, batch); loops over key tiles for dQ.
With ``is_causal`` every loop is split in two: tiles wholly on the visible side of the diagonal run without
the causal mask, only the diagonal tiles apply it, and tiles wholly above it are never visited.

Supported: fp16 / bf16 (fp32 accumulation) and fp32 (tf32x3 dots on GPUs, ~fp32 accuracy; IEEE with
``REWRITE_KERNELS_FP32_PRECISION=ieee``); head dims up to 256 with any value
(padded to a power of two with masked loads, e.g. 80 -> 128); any Nq, Nk (the last tiles are masked);
Nq != Nk; GQA (query head h reads kv head h // (Hq // Hkv)); top-left causal; an additive float mask or a
boolean mask broadcast to [B, H, Nq, Nk] through zero strides (never materialised); ALiBi from per-head
slopes, computed in-kernel as slope[h] * (j - i); soft-capping (Gemma 2, FlashAttention-2's ``softcap``):
s = c * tanh(s / c) on the scaled scores before any mask (in the log2 domain the cap is c * log2(e); tanh is
written with exp2, which every Triton version and its interpreter have, and the backward multiplies dS by
1 - tanh^2 on its way to dQ and dK, the mask's gradient being dS itself); dropout from a Philox stream
(``tl.rand``) keyed by the element's flat index in [B, H, Nq, Nk] plus an offset, regenerated identically in
the backward.
All tensor offsets are formed in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (autotune_enabled, dot_precision, interpret_mode, launch_first_fitting, max_shared_memory,
                       next_pow2)

# --------------------------------------------------------------------------------------------- autotuning

_INTERPRET = interpret_mode()
# In the interpreter nothing is timed: one small config, tiles of 16 (the smallest tl.dot shape).
_INTERPRET_META = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


def _configs(fwd: bool):
    """The autotuning space (pruned per call by ``_prune``)."""
    if fwd:
        tiles = ((64, 32), (64, 64), (128, 32), (128, 64), (128, 128))
        stages = (2, 3, 4)
    else:
        tiles = ((32, 32), (32, 64), (64, 32), (64, 64), (128, 64), (64, 128))
        stages = (1, 2, 3)
    out = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
           for m, n in tiles for w in (4, 8) for st in stages]
    out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2))  # decoding, Nq tiny
    return out


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit or cannot help: tiles much longer than the sequence, tiles whose
    pipelined K/V buffers overflow shared memory, and 8 warps on small tiles."""
    nq, nk = named_args["Nq"], named_args["Nk"]
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    bdv = kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV"))
    q = named_args["Q"]
    elem = q.element_size()
    smem_cap = max_shared_memory(q.device)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > max(16, next_pow2(nq)) or bn > max(16, next_pow2(nk)):
            continue
        smem = (bm * bd + c.num_stages * bn * (bd + bdv)) * elem + bm * bn * 4
        if smem > smem_cap:
            continue
        if c.num_warps == 8 and bm * bn < 64 * 64:
            continue
        if bd >= 256 and bm * bn > 64 * 64:
            continue
        kept.append(c)
    if not kept:  # always leave something to run
        kept = sorted(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))[:1]
    return kept


def _autotuned(kernel, fwd: bool):
    if _INTERPRET:
        return None
    return triton.autotune(
        configs=_configs(fwd),
        key=["N_KEY", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "BIAS_KIND", "HAS_ALIBI", "HAS_DROPOUT", "GROUP_KEY",
             "HAS_SOFTCAP"],
        prune_configs_by={"early_config_prune": _prune},
    )(kernel)


# --------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr):
    """tl.dot with fp32 accumulation; DOT_PREC "upcast" casts the operands to fp32 first (see
    ``_common.dot_precision``: the interpreter cannot multiply bf16)."""
    if DOT_PREC == "upcast":
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=DOT_PREC)
    return r


@triton.jit
def _tanh(x):
    """tanh from exp2 (no libdevice: the interpreter has none): sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1,
    so nothing overflows; the absolute error is a few fp32 ulps of 1."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))   # 2 * log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale,
            bias_ptr, stride_bm, stride_bn, slope_log2,
            IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr,
            win_l, win_r, sinks, HAS_BAND: tl.constexpr, cap_log2=0.0, HAS_SOFTCAP: tl.constexpr = False):
    """Scores of one tile in the log2 domain, -inf where masked, and the soft-cap's derivative.

    q [BLOCK_M, BLOCK_D], k [BLOCK_N, BLOCK_D] -> (s [BLOCK_M, BLOCK_N] fp32, dcap): HAS_SOFTCAP caps the
    scaled scores first, ``s = cap_log2 * tanh(s / cap_log2)`` (the cap times log2(e)), and ``dcap`` is
    ``1 - tanh^2`` (the backward's factor on dS; finite where masked); without it ``dcap`` is ``s`` (unused).
    ``bias_ptr`` points at bias[b, h, 0, 0] (broadcast dims have stride 0). HAS_BAND (the block-sparse
    kernel's token band) keeps only ``i - win_l <= j <= i + win_r``, and the first ``sinks`` keys.
    """
    s = _mm(q, tl.trans(k), DOT_PREC) * qk_scale
    if HAS_SOFTCAP:
        t = _tanh(s / cap_log2)
        s = t * cap_log2
        dcap = 1.0 - t * t
    valid = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    if BIAS_KIND != 0:
        b_ptrs = bias_ptr + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :].to(tl.int64) * stride_bn
        bias = tl.load(b_ptrs, mask=valid, other=0)
        if BIAS_KIND == 1:  # additive float mask
            # finfo.min fills would overflow to -inf in the log2 domain and zero rows eager softmax makes uniform:
            # finite fills are clamped to -1e38 (still exp2(.) == 0 beside any real score); -inf stays -inf
            bias = bias.to(tl.float32)
            bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -1.0e38))
            s += bias * 1.4426950408889634
        else:  # boolean mask (as uint8): keep where != 0
            valid = valid & (bias != 0)
    if HAS_ALIBI:
        s += slope_log2 * (offs_n[None, :] - offs_m[:, None]).to(tl.float32)
    if IS_CAUSAL:  # top-left alignment, as SDPA
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_BAND:
        rel = offs_n[None, :] - offs_m[:, None]
        valid = valid & (((rel >= -win_l) & (rel <= win_r)) | (offs_n[None, :] < sinks))
    s = tl.where(valid, s, float("-inf"))
    if not HAS_SOFTCAP:
        dcap = s
    return s, dcap


@triton.jit
def _dropout_keep(seed, rng_offset, row_base, offs_m, offs_n, Nk, dropout_p):
    """Keep-mask [BLOCK_M, BLOCK_N] of the Philox stream: element (b, h, i, j) uses counter
    rng_offset + ((b * H + h) * Nq + i) * Nk + j, so every kernel regenerates the same draw."""
    offs = rng_offset + (row_base + offs_m[:, None].to(tl.int64)) * Nk + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, offs) >= dropout_p


# --------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_ptr, DMASK, lo, hi,
               offs_m, offs_d, offs_dv, m_ok, Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
               stride_bm, stride_bn, qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK_CAUSAL: tl.constexpr,
               BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               RETURN_DMASK: tl.constexpr, DOT_PREC: tl.constexpr, win_l, win_r, sinks, HAS_BAND: tl.constexpr,
               cap_log2=0.0, HAS_SOFTCAP: tl.constexpr = False):
    """Online-softmax over key tiles [lo, hi): acc [BM, BDV], l_i / m_i [BM] (log2 domain); the band and the
    soft-cap as in ``_scores``."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = offs_n < Nk
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)        # [BN, BD]
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)     # [BN, BDV]
        s, _ = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_ptr, stride_bm, stride_bn, slope_log2,
                       MASK_CAUSAL, BIAS_KIND, HAS_ALIBI, DOT_PREC, win_l, win_r, sinks,
                       HAS_BAND, cap_log2, HAS_SOFTCAP)                            # [BM, BN]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep exp2 finite
        p = tl.math.exp2(s - m_safe[:, None])                    # [BM, BN]
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, row_base, offs_m, offs_n, Nk, dropout_p)
            if RETURN_DMASK:
                d_ptrs = DMASK + (row_base + offs_m[:, None].to(tl.int64)) * Nk + offs_n[None, :].to(tl.int64)
                tl.store(d_ptrs, keep.to(tl.uint8), mask=m_ok[:, None] & n_ok[None, :])
            p = tl.where(keep, p * inv_keep, 0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd(
    Q, K, V, O, LSE, BIAS, SLOPES, RNG, DMASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, Nq, Nk, GROUP, sm_scale, dropout_p, softcap,
    N_KEY, GROUP_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, RETURN_DMASK: tl.constexpr, DOT_PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query rows
    offs_d = tl.arange(0, BLOCK_D)                     # [BD] (HEAD_DIM padded)
    offs_dv = tl.arange(0, BLOCK_DV)                   # [BDV]
    m_ok = offs_m < Nq

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BM, BD]
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    bias_ptr = BIAS + b64 * stride_bb + h64 * stride_bh

    qk_scale = sm_scale * 1.4426950408889634
    cap_log2 = softcap * 1.4426950408889634   # the cap in the log2 domain of the scores
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)
    row_base = (b64 * H + h64) * Nq
    inv_keep = 1.0 / (1.0 - dropout_p)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)        # running P @ V

    if IS_CAUSAL:
        # key tiles wholly left of the diagonal need no causal mask; the rest (up to the last row) do
        hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
        mid = tl.minimum(((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N, hi)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_ptr, DMASK, 0, mid,
                                   offs_m, offs_d, offs_dv, m_ok, Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_bm, stride_bn, qk_scale, slope_log2, seed, rng_offset, row_base,
                                   dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, False, BIAS_KIND, HAS_ALIBI,
                                   HAS_DROPOUT, RETURN_DMASK, DOT_PREC, 0, 0, 0, False, cap_log2, HAS_SOFTCAP)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_ptr, DMASK, mid, hi,
                                   offs_m, offs_d, offs_dv, m_ok, Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_bm, stride_bn, qk_scale, slope_log2, seed, rng_offset, row_base,
                                   dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, True, BIAS_KIND, HAS_ALIBI,
                                   HAS_DROPOUT, RETURN_DMASK, DOT_PREC, 0, 0, 0, False, cap_log2, HAS_SOFTCAP)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_ptr, DMASK, 0, Nk,
                                   offs_m, offs_d, offs_dv, m_ok, Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_bm, stride_bn, qk_scale, slope_log2, seed, rng_offset, row_base,
                                   dropout_p, inv_keep, HEAD_DIM, HEAD_DIM_V, BLOCK_N, False, BIAS_KIND, HAS_ALIBI,
                                   HAS_DROPOUT, RETURN_DMASK, DOT_PREC, 0, 0, 0, False, cap_log2, HAS_SOFTCAP)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + row_base + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------- backward


@triton.jit
def _flash_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, Nq,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (fp32)."""
    pid_m = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)                                   # [BM, BDV]
    do = tl.load(DO + b64 * stride_gb + h64 * stride_gh + rows * stride_gm + offs_dv[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)                                  # [BM, BDV]
    tl.store(DELTA + (b64 * H + h64) * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, bias_ptr, LSE, DELTA, lo, hi, offs_n, offs_d, offs_dv,
                Nq, Nk, stride_qm, stride_qd, stride_gm, stride_gd, stride_bm, stride_bn,
                qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, MASK_CAUSAL: tl.constexpr,
                BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                win_l, win_r, sinks, HAS_BAND: tl.constexpr, cap_log2=0.0, HAS_SOFTCAP: tl.constexpr = False):
    """Accumulate dK [BN, BD] and dV [BN, BDV] of one key tile over the query tiles [lo, hi) of one head; the
    band and the soft-cap as in ``_scores``."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)   # [BM]
        m_ok = offs_m < Nq
        rows_m = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + rows_m * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)       # [BM, BD]
        do = tl.load(do_base + rows_m * stride_gm + offs_dv[None, :] * stride_gd,
                     mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)   # [BM, BDV]
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows -> P = 0
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        s, dcap = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_ptr, stride_bm, stride_bn, slope_log2,
                          MASK_CAUSAL, BIAS_KIND, HAS_ALIBI, DOT_PREC, win_l, win_r, sinks,
                          HAS_BAND, cap_log2, HAS_SOFTCAP)                         # [BM, BN]
        p = tl.math.exp2(s - lse2[:, None])                                          # [BM, BN]
        dp = _mm(do, tl.trans(v), DOT_PREC)                                          # [BM, BN]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, row_base, offs_m, offs_n, Nk, dropout_p)
            pd = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            pd = p
        dv += _mm(tl.trans(pd.to(do.dtype)), do, DOT_PREC)                           # [BN, BDV]
        ds = p * (dp - delta[:, None])                                               # [BM, BN]
        if HAS_SOFTCAP:
            ds = ds * dcap
        dk += _mm(tl.trans(ds.to(q.dtype)), q, DOT_PREC)                             # [BN, BD]
    return dk, dv


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_ptr, dbias_base, stride_dbm, lo, hi, offs_m, offs_d,
              offs_dv, Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
              qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK_CAUSAL: tl.constexpr,
              BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
              WRITE_DBIAS: tl.constexpr, win_l, win_r, sinks, HAS_BAND: tl.constexpr,
              cap_log2=0.0, HAS_SOFTCAP: tl.constexpr = False):
    """Accumulate dQ [BM, BD] of one query tile over the key tiles [lo, hi) (the band as in ``_scores``). WRITE_DBIAS also writes each dS
    tile (the gradient of an additive mask) to the fp32 rows at ``dbias_base`` (row stride ``stride_dbm``, key
    stride 1): 1 stores it (this program owns those elements), 2 adds it atomically (the mask is shared over
    batch or heads), 3 adds its column sums atomically (the mask is shared over queries too: one row)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)   # [BN]
        n_ok = offs_n < Nk
        rows_n = offs_n[:, None].to(tl.int64)
        k = tl.load(k_base + rows_n * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)        # [BN, BD]
        v = tl.load(v_base + rows_n * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)     # [BN, BDV]
        s, dcap = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_ptr, stride_bm, stride_bn, slope_log2,
                          MASK_CAUSAL, BIAS_KIND, HAS_ALIBI, DOT_PREC, win_l, win_r, sinks,
                          HAS_BAND, cap_log2, HAS_SOFTCAP)                         # [BM, BN]
        p = tl.math.exp2(s - lse2[:, None])
        dp = _mm(do, tl.trans(v), DOT_PREC)                                           # [BM, BN]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, row_base, offs_m, offs_n, Nk, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if WRITE_DBIAS == 1:
            tl.store(dbias_base + offs_m[:, None].to(tl.int64) * stride_dbm + offs_n[None, :], ds,
                     mask=(offs_m < Nq)[:, None] & n_ok[None, :])
        elif WRITE_DBIAS == 2:
            tl.atomic_add(dbias_base + offs_m[:, None].to(tl.int64) * stride_dbm + offs_n[None, :], ds,
                          mask=(offs_m < Nq)[:, None] & n_ok[None, :])
        elif WRITE_DBIAS == 3:
            tl.atomic_add(dbias_base + offs_n, tl.sum(ds, axis=0), mask=n_ok)   # rows past Nq have dS = 0
        if HAS_SOFTCAP:   # the mask's gradient is dS after the cap; q and k see it through the cap
            ds = ds * dcap
        dq += _mm(ds.to(k.dtype), k, DOT_PREC)                                        # [BM, BD]
    return dq


@triton.jit
def _flash_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, BIAS, SLOPES, RNG, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Nq, Nk, GROUP, sm_scale, dropout_p, softcap,
    N_KEY, GROUP_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # [BN] key rows of this program
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + rows_n * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)          # [BN, BD]
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + rows_n * stride_vn + offs_dv[None, :] * stride_vd,
                mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)       # [BN, BDV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    qk_scale = sm_scale * 1.4426950408889634
    cap_log2 = softcap * 1.4426950408889634   # the cap in the log2 domain of the scores
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)
    inv_keep = 1.0 / (1.0 - dropout_p)
    if IS_CAUSAL:
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M  # rows i >= first key of the tile
    else:
        lo = 0

    for g in range(0, GROUP):
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        slope_log2 = 0.0
        if HAS_ALIBI:
            slope_log2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        row_base = (b64 * H + h64) * Nq
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_gb + h64 * stride_gh
        bias_ptr = BIAS + b64 * stride_bb + h64 * stride_bh
        if IS_CAUSAL:
            # query tiles wholly below the diagonal (first row >= last key of this tile) need no causal mask
            mid = tl.maximum(tl.minimum(tl.cdiv((pid_n + 1) * BLOCK_N - 1, BLOCK_M) * BLOCK_M, Nq), lo)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, bias_ptr, LSE, DELTA, lo, mid, offs_n, offs_d, offs_dv,
                                 Nq, Nk, stride_qm, stride_qd, stride_gm, stride_gd, stride_bm, stride_bn,
                                 qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_M, True, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT, DOT_PREC,
                                 0, 0, 0, False, cap_log2, HAS_SOFTCAP)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, bias_ptr, LSE, DELTA, mid, Nq, offs_n, offs_d, offs_dv,
                                 Nq, Nk, stride_qm, stride_qd, stride_gm, stride_gd, stride_bm, stride_bn,
                                 qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_M, False, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT, DOT_PREC,
                                 0, 0, 0, False, cap_log2, HAS_SOFTCAP)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, bias_ptr, LSE, DELTA, 0, Nq, offs_n, offs_d, offs_dv,
                                 Nq, Nk, stride_qm, stride_qd, stride_gm, stride_gd, stride_bm, stride_bn,
                                 qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_M, False, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT, DOT_PREC,
                                 0, 0, 0, False, cap_log2, HAS_SOFTCAP)

    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + rows_n * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + rows_n * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _flash_bwd_dq(
    Q, K, V, DO, LSE, DELTA, BIAS, SLOPES, RNG, DQ, DBIAS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dbb, stride_dbh, stride_dbm,
    H, Nq, Nk, GROUP, sm_scale, dropout_p, softcap,
    N_KEY, GROUP_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, WRITE_DBIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BM]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    rows_m = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows_m * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)            # [BM, BD]
    do = tl.load(DO + b64 * stride_gb + h64 * stride_gh + rows_m * stride_gm + offs_dv[None, :] * stride_gd,
                 mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)        # [BM, BDV]
    row_base = (b64 * H + h64) * Nq
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    bias_ptr = BIAS + b64 * stride_bb + h64 * stride_bh
    dbias_base = DBIAS + b64 * stride_dbb + h64 * stride_dbh     # strides 0 where the mask is shared
    qk_scale = sm_scale * 1.4426950408889634
    cap_log2 = softcap * 1.4426950408889634   # the cap in the log2 domain of the scores
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)
    inv_keep = 1.0 / (1.0 - dropout_p)
    if IS_CAUSAL:
        hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
        mid = tl.minimum(((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N, hi)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_ptr, dbias_base, stride_dbm, 0, mid, offs_m, offs_d, offs_dv,
                       Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                       qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
                       HEAD_DIM, HEAD_DIM_V, BLOCK_N, False, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT, DOT_PREC,
                       WRITE_DBIAS, 0, 0, 0, False, cap_log2, HAS_SOFTCAP)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_ptr, dbias_base, stride_dbm, mid, hi, offs_m, offs_d, offs_dv,
                       Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                       qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
                       HEAD_DIM, HEAD_DIM_V, BLOCK_N, True, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT, DOT_PREC,
                       WRITE_DBIAS, 0, 0, 0, False, cap_log2, HAS_SOFTCAP)
    else:
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_ptr, dbias_base, stride_dbm, 0, Nk, offs_m, offs_d, offs_dv,
                       Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                       qk_scale, slope_log2, seed, rng_offset, row_base, dropout_p, inv_keep,
                       HEAD_DIM, HEAD_DIM_V, BLOCK_N, False, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT, DOT_PREC,
                       WRITE_DBIAS, 0, 0, 0, False, cap_log2, HAS_SOFTCAP)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows_m * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


_flash_fwd_tuned = _autotuned(_flash_fwd, fwd=True)
_flash_bwd_dkdv_tuned = _autotuned(_flash_bwd_dkdv, fwd=False)
_flash_bwd_dq_tuned = _autotuned(_flash_bwd_dq, fwd=False)


# --------------------------------------------------------------------------------------------- launchers


def _bias_args(attn_mask, q, B, H, Nq, Nk):
    """(tensor, kind, strides) for the mask: 0 none, 1 additive float, 2 boolean (read as uint8).
    The mask is broadcast to [B, H, Nq, Nk] by ``expand`` (zero strides), never copied."""
    if attn_mask is None:
        return q, 0, (0, 0, 0, 0)
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, H, Nq, Nk)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # a view, same strides
        kind = 2
    else:
        kind = 1
    return m, kind, tuple(m.stride())


def _default_metas(block_d: int, fwd: bool, elem_size: int = 2):
    """Configs for the no-autotuning path, best first; the launcher takes the first that fits the device
    (fp32 or head dim 128+ tiles can exceed the shared memory of smaller GPUs)."""
    if _INTERPRET:
        return [dict(_INTERPRET_META)]
    if elem_size >= 4:  # fp32: start smaller (twice the bytes per tile)
        prefs = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
    elif fwd:
        prefs = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
    else:
        prefs = [(64, 64, 8 if block_d >= 128 else 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
    if block_d >= 256:
        prefs = [p for p in prefs if p[0] * p[1] <= 64 * 32]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in prefs]


def _launch(tuned, plain, grid_fn, args, kwargs, fwd=True):
    if tuned is None or not autotune_enabled():
        bd = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        key = (plain.__name__, args[0].dtype, args[0].device.index, bd, tuple(sorted(kwargs.items())))
        metas = _default_metas(bd, fwd, args[0].element_size())
        launch_first_fitting(plain, grid_fn, args, kwargs, metas, key)
    else:
        tuned[grid_fn](*args, **kwargs)


def _common_meta(q, k, v, attn_mask, alibi_slopes, is_causal, dropout_p, softcap=0.0):
    B, H, Nq, D = q.shape
    Dv = v.shape[3]
    if D > 256 or Dv > 256:
        raise ValueError(f"flash_attention (Triton): head dims up to 256 are supported, got {D}/{Dv}")
    return dict(
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=next_pow2(D), BLOCK_DV=next_pow2(Dv),
        IS_CAUSAL=bool(is_causal), HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout_p > 0.0,
        DOT_PREC=dot_precision(q.dtype), HAS_SOFTCAP=bool(softcap),
    )


def flash_fwd(q, k, v, attn_mask, alibi_slopes, rng_state, is_causal, scale, dropout_p, return_dropout_mask,
              softcap=0.0):
    """Launch the forward. Returns (out [B, Hq, Nq, Dv], lse [B, Hq, Nq] fp32, keep-mask uint8 or empty);
    ``softcap`` 0 (or None) means no soft-capping."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, H, Nq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    bias, bias_kind, bs = _bias_args(attn_mask, q, B, H, Nq, Nk)
    meta = _common_meta(q, k, v, attn_mask, alibi_slopes, is_causal, dropout_p, softcap)
    want_mask = bool(return_dropout_mask) and dropout_p > 0.0
    dmask = (torch.zeros((B, H, Nq, Nk), device=q.device, dtype=torch.uint8) if want_mask
             else torch.empty((0,), device=q.device, dtype=torch.uint8))
    slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous() if alibi_slopes is not None else lse
    rng = rng_state.to(device=q.device, dtype=torch.int64).contiguous() if dropout_p > 0.0 else lse
    if Nq == 0 or Nk == 0 or B == 0 or H == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, dmask
    args = (q, k, v, out, lse, bias, slopes, rng, dmask if want_mask else lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bs,
            H, Nq, Nk, H // Hkv, float(scale), float(dropout_p), float(softcap or 0.0),
            next_pow2(max(Nq, Nk)), min(H // Hkv, 8))
    kwargs = dict(meta, BIAS_KIND=bias_kind, RETURN_DMASK=want_mask)
    _launch(_flash_fwd_tuned, _flash_fwd, lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), H, B), args, kwargs)
    return out, lse, dmask


def flash_bwd(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, rng_state, is_causal, scale, dropout_p,
              mask_grad=False, softcap=0.0):
    """Launch the backward kernels. Returns (dq, dk, dv) in the input dtypes and dS [B, H, Nq, Nk] fp32 (the
    gradient of an additive mask before it is summed to the mask's shape; empty unless ``mask_grad``)."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # dS summed in-kernel over the batch / head / query dims the mask is shared along (never a [B, H, Nq, Nk]
    # buffer for T5's [1, H, N, N] bias); zeros: causal key tiles above the diagonal are never visited
    ds, db_strides, db_mode = _dbias_buffer(attn_mask, q, B, H, Nq, Nk) if mask_grad else (lse.new_empty(0),
                                                                                           (0, 0, 0), 0)
    if Nq == 0 or Nk == 0 or B == 0 or H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), ds
    grad_out = grad_out.to(q.dtype)
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    bdv = next_pow2(Dv)
    pre_bm = 16 if _INTERPRET else 64
    _flash_bwd_preprocess[(triton.cdiv(Nq, pre_bm), H, B)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Nq,
        HEAD_DIM_V=Dv, BLOCK_DV=bdv, BLOCK_M=pre_bm)
    bias, bias_kind, bs = _bias_args(attn_mask, q, B, H, Nq, Nk)
    meta = _common_meta(q, k, v, attn_mask, alibi_slopes, is_causal, dropout_p, softcap)
    slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous() if alibi_slopes is not None else lse
    rng = rng_state.to(device=q.device, dtype=torch.int64).contiguous() if dropout_p > 0.0 else lse
    lse = lse.contiguous()
    tail = (H, Nq, Nk, H // Hkv, float(scale), float(dropout_p), float(softcap or 0.0), next_pow2(max(Nq, Nk)),
            min(H // Hkv, 8))
    kwargs = dict(meta, BIAS_KIND=bias_kind)
    _launch(_flash_bwd_dkdv_tuned, _flash_bwd_dkdv, lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), Hkv, B),
            (q, k, v, grad_out, lse, delta, bias, slopes, rng, dk, dv,
             *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *bs, *dk.stride(), *dv.stride(), *tail),
            kwargs, fwd=False)
    # atomic dS adds must not run once per autotuning trial: those launches take the fixed configs
    _launch(_flash_bwd_dq_tuned if db_mode < 2 else None, _flash_bwd_dq,
            lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), H, B),
            (q, k, v, grad_out, lse, delta, bias, slopes, rng, dq, ds if mask_grad else lse,
             *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *bs, *dq.stride(), *db_strides, *tail),
            dict(kwargs, WRITE_DBIAS=db_mode), fwd=False)
    return dq, dk, dv, ds


def _dbias_buffer(attn_mask, q, B, H, Nq, Nk):
    """(fp32 zeros [B or 1, H or 1, Nq or 1, Nk], its (batch, head, row) strides with 0 on shared dims, the
    dQ kernel's WRITE_DBIAS mode) for the gradient of a float mask broadcast to [B, H, Nq, Nk]."""
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    size = (shape[0] if shape[0] == 1 else B, shape[1] if shape[1] == 1 else H, shape[2] if shape[2] == 1 else Nq,
            Nk)
    buf = torch.zeros(size, device=q.device, dtype=torch.float32)
    strides = tuple(0 if n == 1 else st for n, st in zip(size[:3], buf.stride()[:3]))
    shared = (size[0] == 1 and B > 1) or (size[1] == 1 and H > 1)
    mode = 3 if size[2] == 1 and Nq > 1 else (2 if shared else 1)
    return buf, strides, mode
