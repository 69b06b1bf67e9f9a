"""Triton kernels of ``rewrite::block_sparse_attention``.

The block mask is compressed on the host (a few small torch ops over the [Nq_blocks, Nk_blocks] grid) into,
per (batch, head, query block), the count and ascending list of kept key blocks; and, for the dK/dV kernel,
per key block the list of query blocks that attend to it. Each program walks only its list, so the work is
proportional to the kept blocks; a causal call first drops blocks lying wholly above the diagonal, and skips
the sub-tiles of diagonal blocks that lie above it.

Sparsity blocks (BLOCK_Q x BLOCK_K, powers of two >= 16) and kernel tiles (BLOCK_M x BLOCK_N, autotuned,
dividing them) are decoupled: a kept block is processed as BLOCK_Q / BLOCK_M x BLOCK_K / BLOCK_N tiles, so
large sparsity blocks (128, 256) run with tiles that fit the GPU's shared memory. The tile loops are the flash
kernels' own (``_fwd_inner``, ``_dq_inner``, ``_dkdv_inner``: online fp32 softmax, additive or boolean
``attn_mask`` broadcast by zero strides, top-left causal), GQA maps query head h to kv head h // (Hq // Hkv),
head dims are padded to powers of two, offsets are int64.

Optional token-level band (``HAS_BAND``): key ``j`` is admissible for query ``i`` iff
``i - WIN_L <= j <= i + WIN_R`` or ``j < SINKS`` (ANDed with the block mask, ``attn_mask`` and causal). The
flash tile loops apply it in their shared ``_scores``; the kernels here also narrow each kept block's tile range
to the tiles the band reaches (sink tiles are always visited), so a block mask covering the band's blocks plus
a band gives exact sliding-window attention in time proportional to the kept blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (autotune_enabled, dot_precision, interpret_mode, launch_first_fitting, max_shared_memory,
                       next_pow2)
from ..flash_attention.triton import _bias_args, _dkdv_inner, _dq_inner, _flash_bwd_preprocess, _fwd_inner

_INTERPRET = interpret_mode()


def _configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in ((32, 32), (64, 32), (32, 64), (64, 64), (128, 64), (64, 128), (128, 128))
            for w in (4, 8) for s in (1, 2, 3)]


def _prune(configs, named_args, **kwargs):
    bq, bk = kwargs["BLOCK_Q"], kwargs["BLOCK_K"]
    bd, bdv = kwargs["BLOCK_D"], kwargs["BLOCK_DV"]
    q = named_args["Q"]
    cap = max_shared_memory(q.device)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > bq or bn > bk:   # tiles must divide the sparsity blocks (all powers of two)
            continue
        if (bm * bd + c.num_stages * bn * (bd + bdv)) * q.element_size() + bm * bn * 4 > cap:
            continue
        if c.num_warps == 8 and bm * bn < 64 * 64:
            continue
        kept.append(c)
    return kept or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]


def _autotuned(kernel):
    if _INTERPRET:
        return None
    return triton.autotune(configs=_configs(), key=["N_KEY", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "BIAS_KIND",
                                                    "BLOCK_Q", "BLOCK_K", "HAS_BAND"],
                           prune_configs_by={"early_config_prune": _prune})(kernel)


# --------------------------------------------------------------------------------------------- band helpers


@triton.jit
def _band_key_range(lo, hi, row0, row1, win_l, win_r, sinks, BLOCK_N: tl.constexpr):
    """Narrow the key range [lo, hi) of one kept block for query rows [row0, row1] to the tiles the band
    reaches (aligned to BLOCK_N inside the block); a range starting among the sinks is left alone."""
    if lo >= sinks:
        first = tl.maximum(row0 - win_l, 0)
        lo = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(hi, row1 + win_r + 1)
    return lo, hi


@triton.jit
def _bs_fwd(
    Q, K, V, O, LSE, BIAS, CNT, IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_cb, stride_ch, stride_cr,
    stride_ib, stride_ih, stride_ir, stride_ic,
    H, Nq, Nk, GROUP, sm_scale, N_KEY, WIN_L, WIN_R, SINKS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PREC: tl.constexpr, HAS_BAND: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)   # query tile (BLOCK_M rows) inside query block pid_m * BLOCK_M // BLOCK_Q
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BM]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)             # [BM, BD]
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    bias_ptr = BIAS + b64 * stride_bb + h64 * stride_bh
    qblock = (pid_m * BLOCK_M) // BLOCK_Q
    cnt = tl.load(CNT + b64 * stride_cb + h64 * stride_ch + qblock * stride_cr)
    idx_base = IDX + b64 * stride_ib + h64 * stride_ih + qblock * stride_ir
    qk_scale = sm_scale * 1.4426950408889634
    row_base = (b64 * H + h64) * Nq
    if IS_CAUSAL:
        causal_end = (pid_m + 1) * BLOCK_M   # keys past the tile's last row are all masked
    else:
        causal_end = Nk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for t in range(0, cnt):
        kb = tl.load(idx_base + t * stride_ic)
        lo = kb * BLOCK_K
        hi = tl.minimum(tl.minimum(lo + BLOCK_K, Nk), causal_end)
        if HAS_BAND:
            lo, hi = _band_key_range(lo, hi, pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M - 1, WIN_L, WIN_R, SINKS,
                                     BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_ptr, LSE, lo, hi,
                                   offs_m, offs_d, offs_dv, m_ok, Nq, Nk, stride_kn, stride_kd, stride_vn,
                                   stride_vd, stride_bm, stride_bn, qk_scale, 0.0, 0, 0, row_base, 0.0, 1.0,
                                   HEAD_DIM, HEAD_DIM_V, BLOCK_N, IS_CAUSAL, BIAS_KIND, False, False, False,
                                   DOT_PREC, WIN_L, WIN_R, SINKS, HAS_BAND)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
             + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + row_base + offs_m, lse, mask=m_ok)


@triton.jit
def _bs_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, BIAS, CNT, IDX, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_cb, stride_ch, stride_cr,
    stride_ib, stride_ih, stride_ir, stride_ic,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Nq, Nk, GROUP, sm_scale, N_KEY, WIN_L, WIN_R, SINKS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PREC: tl.constexpr, HAS_BAND: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """CNT / IDX here are the transposed lists: per key block, the query blocks attending to it."""
    pid_n = tl.program_id(0)   # key tile (BLOCK_N rows) inside key block pid_n * BLOCK_N // BLOCK_K
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + rows_n * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)             # [BN, BD]
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + rows_n * stride_vn + offs_dv[None, :] * stride_vd,
                mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)          # [BN, BDV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    kblock = (pid_n * BLOCK_N) // BLOCK_K
    if IS_CAUSAL:
        causal_start = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M   # query rows before the first key: masked
    else:
        causal_start = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        row_base = (b64 * H + h64) * Nq
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_gb + h64 * stride_gh
        bias_ptr = BIAS + b64 * stride_bb + h64 * stride_bh
        cnt = tl.load(CNT + b64 * stride_cb + h64 * stride_ch + kblock * stride_cr)
        idx_base = IDX + b64 * stride_ib + h64 * stride_ih + kblock * stride_ir
        for t in range(0, cnt):
            qb = tl.load(idx_base + t * stride_ic)
            lo = tl.maximum(qb * BLOCK_Q, causal_start)
            hi = tl.minimum(qb * BLOCK_Q + BLOCK_Q, Nq)
            if HAS_BAND:
                # query rows the band reaches from keys [n0, n1]: n0 - WIN_R .. n1 + WIN_L (all rows for sinks)
                n0 = pid_n * BLOCK_N
                if n0 >= SINKS:
                    first = tl.maximum(n0 - WIN_R, 0)
                    lo = tl.maximum(lo, (first // BLOCK_M) * BLOCK_M)
                    hi = tl.minimum(hi, n0 + BLOCK_N + WIN_L)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, bias_ptr, LSE, DELTA, lo, hi, offs_n, offs_d,
                                 offs_dv, Nq, Nk, stride_qm, stride_qd, stride_gm, stride_gd, stride_bm, stride_bn,
                                 qk_scale, 0.0, 0, 0, row_base, 0.0, 1.0,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_M, IS_CAUSAL, BIAS_KIND, False, False, DOT_PREC,
                                 WIN_L, WIN_R, SINKS, HAS_BAND)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + rows_n * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + rows_n * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _bs_bwd_dq(
    Q, K, V, DO, LSE, DELTA, BIAS, CNT, IDX, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_cb, stride_ch, stride_cr,
    stride_ib, stride_ih, stride_ir, stride_ic,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Nq, Nk, GROUP, sm_scale, N_KEY, WIN_L, WIN_R, SINKS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PREC: tl.constexpr, HAS_BAND: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    rows_m = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows_m * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)             # [BM, BD]
    do = tl.load(DO + b64 * stride_gb + h64 * stride_gh + rows_m * stride_gm + offs_dv[None, :] * stride_gd,
                 mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)         # [BM, BDV]
    row_base = (b64 * H + h64) * Nq
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    bias_ptr = BIAS + b64 * stride_bb + h64 * stride_bh
    qblock = (pid_m * BLOCK_M) // BLOCK_Q
    cnt = tl.load(CNT + b64 * stride_cb + h64 * stride_ch + qblock * stride_cr)
    idx_base = IDX + b64 * stride_ib + h64 * stride_ih + qblock * stride_ir
    qk_scale = sm_scale * 1.4426950408889634
    if IS_CAUSAL:
        causal_end = (pid_m + 1) * BLOCK_M
    else:
        causal_end = Nk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, cnt):
        kb = tl.load(idx_base + t * stride_ic)
        lo = kb * BLOCK_K
        hi = tl.minimum(tl.minimum(lo + BLOCK_K, Nk), causal_end)
        if HAS_BAND:
            lo, hi = _band_key_range(lo, hi, pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M - 1, WIN_L, WIN_R, SINKS,
                                     BLOCK_N)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_ptr, bias_ptr, 0, lo, hi, offs_m, offs_d,
                       offs_dv, Nq, Nk, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                       qk_scale, 0.0, 0, 0, row_base, 0.0, 1.0,
                       HEAD_DIM, HEAD_DIM_V, BLOCK_N, IS_CAUSAL, BIAS_KIND, False, False, DOT_PREC, False,
                       WIN_L, WIN_R, SINKS, HAS_BAND)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows_m * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


_bs_fwd_tuned = _autotuned(_bs_fwd)
_bs_bwd_dkdv_tuned = _autotuned(_bs_bwd_dkdv)
_bs_bwd_dq_tuned = _autotuned(_bs_bwd_dq)


# --------------------------------------------------------------------------------------------- launchers


def _check_block(bs: int, name: str):
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_sparse_attention (Triton): {name} must be a power of two >= 16, got {bs}")


def compress(block_mask: torch.Tensor, B: int, H: int):
    """(counts [B, H, R] int32, indices [B, H, R, C] int32) of a bool mask [Bm, Hm, R, C]: row r's kept
    columns in ascending order first. Broadcast dims come back with stride 0 (no copy)."""
    m = block_mask.bool()
    cnt = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~m).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    R, C = m.shape[-2:]
    return cnt.expand(B, H, R), idx.expand(B, H, R, C)


def prepare_block_mask(block_mask, B, H, Nq, Nk, bq, bk, is_causal):
    from .masks import causal_block_mask, num_blocks
    m = block_mask.bool()
    while m.dim() < 4:
        m = m.unsqueeze(0)
    nqb, nkb = num_blocks(Nq, bq), num_blocks(Nk, bk)
    if m.shape[-2:] != (nqb, nkb):
        raise ValueError(f"block_mask has {tuple(m.shape[-2:])} blocks, expected ({nqb}, {nkb}) for "
                         f"Nq={Nq}, Nk={Nk}, block sizes ({bq}, {bk})")
    if is_causal:  # drop blocks wholly above the diagonal: no work for them
        m = m & causal_block_mask(Nq, Nk, bq, bk, m.device)
    return m


def _default_metas(bq: int, bk: int, elem_size: int):
    if _INTERPRET:
        return [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)]
    prefs = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
    if elem_size < 4:
        prefs = [(128, 64, 8, 2)] + prefs
    out = []
    for m, n, w, st in prefs:
        meta = dict(BLOCK_M=min(m, bq), BLOCK_N=min(n, bk), num_warps=w, num_stages=st)
        if meta not in out:
            out.append(meta)
    return out


def _launch(tuned, plain, grid_fn, args, kwargs):
    if tuned is None or not autotune_enabled():
        metas = _default_metas(kwargs["BLOCK_Q"], kwargs["BLOCK_K"], args[0].element_size())
        key = (plain.__name__, args[0].dtype, args[0].device.index, tuple(sorted(kwargs.items())))
        launch_first_fitting(plain, grid_fn, args, kwargs, metas, key)
    else:
        tuned[grid_fn](*args, **kwargs)


def _band_args(window, sinks, Nq, Nk):
    """(WIN_L, WIN_R, SINKS, HAS_BAND) from ``window`` = (left, right) (None or a negative side: unbounded)."""
    if window is None and not sinks:
        return 0, 0, 0, False
    big = int(Nq) + int(Nk) + 1
    left, right = window if window is not None else (-1, -1)
    left = big if left is None or left < 0 else min(int(left), big)
    right = big if right is None or right < 0 else min(int(right), big)
    return left, right, int(sinks or 0), True


def _meta(q, k, v, bq, bk, is_causal, bias_kind, has_band=False):
    D, Dv = q.shape[3], v.shape[3]
    if D > 256 or Dv > 256:
        raise ValueError(f"block_sparse_attention (Triton): head dims up to 256, got {D}/{Dv}")
    return dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=next_pow2(D), BLOCK_DV=next_pow2(Dv), IS_CAUSAL=bool(is_causal),
                BIAS_KIND=bias_kind, DOT_PREC=dot_precision(q.dtype), BLOCK_Q=bq, BLOCK_K=bk, HAS_BAND=bool(has_band))


def bs_fwd(q, k, v, block_mask, attn_mask, bq, bk, is_causal, scale, window=None, sinks=0):
    _check_block(bq, "block_size_q")
    _check_block(bk, "block_size_k")
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, H, Nq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if min(B, H, Nq, Nk) == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    m = prepare_block_mask(block_mask, B, H, Nq, Nk, bq, bk, is_causal)
    cnt, idx = compress(m, B, H)
    bias, bias_kind, bs = _bias_args(attn_mask, q, B, H, Nq, Nk)
    wl, wr, ns, band = _band_args(window, sinks, Nq, Nk)
    args = (q, k, v, out, lse, bias, cnt, idx, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bs,
            *cnt.stride(), *idx.stride(), H, Nq, Nk, H // Hkv, float(scale), next_pow2(max(Nq, Nk)),
            wl, wr, ns)
    _launch(_bs_fwd_tuned, _bs_fwd, lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), H, B), args,
            _meta(q, k, v, bq, bk, is_causal, bias_kind, band))
    return out, lse


def bs_bwd(grad_out, q, k, v, out, lse, block_mask, attn_mask, bq, bk, is_causal, scale, window=None, sinks=0):
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if min(B, H, Nq, Nk) == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.to(q.dtype)
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    pre_bm = 16 if _INTERPRET else 64
    _flash_bwd_preprocess[(triton.cdiv(Nq, pre_bm), H, B)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Nq,
        HEAD_DIM_V=Dv, BLOCK_DV=next_pow2(Dv), BLOCK_M=pre_bm)
    m = prepare_block_mask(block_mask, B, H, Nq, Nk, bq, bk, is_causal)
    cnt, idx = compress(m, B, H)
    cnt_t, idx_t = compress(m.transpose(-1, -2), B, H)
    bias, bias_kind, bs = _bias_args(attn_mask, q, B, H, Nq, Nk)
    wl, wr, ns, band = _band_args(window, sinks, Nq, Nk)
    meta = _meta(q, k, v, bq, bk, is_causal, bias_kind, band)
    lse = lse.contiguous()
    tail = (H, Nq, Nk, H // Hkv, float(scale), next_pow2(max(Nq, Nk)), wl, wr, ns)
    _launch(_bs_bwd_dkdv_tuned, _bs_bwd_dkdv, lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), Hkv, B),
            (q, k, v, grad_out, lse, delta, bias, cnt_t, idx_t, dk, dv, *q.stride(), *k.stride(), *v.stride(),
             *grad_out.stride(), *bs, *cnt_t.stride(), *idx_t.stride(), *dk.stride(), *dv.stride(), *tail), meta)
    _launch(_bs_bwd_dq_tuned, _bs_bwd_dq, lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), H, B),
            (q, k, v, grad_out, lse, delta, bias, cnt, idx, dq, *q.stride(), *k.stride(), *v.stride(),
             *grad_out.stride(), *bs, *cnt.stride(), *idx.stride(), *dq.stride(), *tail), meta)
    return dq, dk, dv
