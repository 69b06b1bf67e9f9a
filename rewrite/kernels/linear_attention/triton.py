"""Triton kernels of ``rewrite::linear_attention`` (chunked linear attention, forward and backward).

Notation: F = feature dim (= D for elu / relu, applied in-kernel on load; = m for precomputed FAVOR+ features),
Dv = value dim, C = chunk length (BLOCK_C). All arithmetic is fp32 (tiles are upcast on load; fp32 dots are
IEEE for fp32 inputs, TF32 for 16-bit inputs, matching their precision).

Forward ``_la_fwd``: one program per (value tile of BLOCK_V columns, head, batch). Causal: walk chunks in order
with a state S = sum phi(k_j) v_j^T [F, BLOCK_V] and z = sum phi(k_j) [F];
  out_c = (phi(Q_c) S + tril(phi(Q_c) phi(K_c)^T) V_c) / (phi(Q_c) z + rowsum(tril(...)) + eps).
Bidirectional: one pass accumulates S, z over the keys, a second pass writes the outputs (Nq may differ from Nk).
The denominator D_i (eps included) is saved for the backward.

Backward, with gn_i = dO_i / D_i and gd_i = -(dO_i . O_i) / D_i (gd precomputed on the host):
  dphi(q_i) = sum_{j in S(i)} (gn_i . v_j + gd_i) phi(k_j)       -> ``_la_bwd_dq``   (forward chunk order)
  dphi(k_j) = sum_{i: j in S(i)} (gn_i . v_j + gd_i) phi(q_i)    -> ``_la_bwd_dk``   (reverse chunk order)
  dv_j      = sum_{i: j in S(i)} (phi(q_i) . phi(k_j)) gn_i      -> ``_la_bwd_dv``   (reverse chunk order)
then dq = dphi(q) * phi'(q) (likewise dk) for the in-kernel feature maps. dq / dk programs tile the feature dim
(one program per feature tile, full Dv); dv programs tile Dv (full F). Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import autotune_enabled, interpret_mode, launch_first_fitting, next_pow2
from .._common import dot_precision as _fp32_precision

_INTERPRET = interpret_mode()
FEATURE_CODES = {"identity": 0, "elu": 1, "relu": 2}
MAX_FEATURE_BLOCK = 256  # F (padded) held in one tile by the forward and dv kernels


def _configs(tile_name: str):
    return [triton.Config({"BLOCK_C": c, tile_name: t}, num_warps=w, num_stages=s)
            for c in (32, 64) for t in (32, 64, 128) for w in (4, 8) for s in (1, 2)]


def _prune_factory(tile_name: str, full_name: str):
    def prune(configs, named_args, **kwargs):
        full = kwargs[full_name]     # the dim held whole (F or Dv, padded)
        tiled = kwargs[tile_name.replace("BLOCK_", "PAD_")]
        kept = []
        for c in configs:
            t = c.kwargs[tile_name]
            if t > max(32, tiled):
                continue
            if full * t > 128 * 128:     # fp32 state [full, tile] in registers
                continue
            if c.num_warps == 8 and full * t < 64 * 64:
                continue
            kept.append(c)
        return kept or configs[:1]
    return prune


def _autotuned(kernel, tile_name, full_name):
    if _INTERPRET:
        return None
    return triton.autotune(configs=_configs(tile_name),
                           key=["N_KEY", "F_DIM", "V_DIM", "CAUSAL", "FEATURE"],
                           prune_configs_by={"early_config_prune": _prune_factory(tile_name, full_name)})(kernel)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """Feature map on an fp32 tile: 0 identity, 1 elu(x) + 1, 2 relu(x)."""
    if FEATURE == 1:
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """d phi / dx on an fp32 tile."""
    if FEATURE == 1:
        y = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        y = tl.where(x > 0, 1.0, 0.0)
    else:
        y = x * 0.0 + 1.0
    return y


@triton.jit
def _load_feat(base, rows, n, stride_n, cols, ncols, stride_f, FEATURE: tl.constexpr):
    """phi(x) of a [len(rows), len(cols)] tile, fp32, exactly 0 outside the tensor (phi(0) may be nonzero)."""
    ok = (rows[:, None] < n) & (cols[None, :] < ncols)
    x = tl.load(base + rows[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_f, mask=ok, other=0.0)
    return tl.where(ok, _phi(x.to(tl.float32), FEATURE), 0.0)


@triton.jit
def _load_f32(base, rows, n, stride_n, cols, ncols, stride_f):
    ok = (rows[:, None] < n) & (cols[None, :] < ncols)
    return tl.load(base + rows[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_f,
                   mask=ok, other=0.0).to(tl.float32)


# --------------------------------------------------------------------------------------------- forward


@triton.jit
def _la_fwd(
    Q, K, V, O, DEN,
    stride_qb, stride_qh, stride_qn, stride_qf,
    stride_kb, stride_kh, stride_kn, stride_kf,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, Nq, Nk, eps, N_KEY,
    F_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_F: tl.constexpr, PAD_V: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    offs_f = tl.arange(0, BLOCK_F)                        # [BF]
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)      # [BV]
    offs_c = tl.arange(0, BLOCK_C)                        # [BC]
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    o_base = O + b64 * stride_ob + h64 * stride_oh
    den_base = DEN + (b64 * H + h64) * Nq
    den_rows = tl.where(pid_v == 0, Nq, 0)  # only the first value tile stores the denominator
    state = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)   # S = sum phi(k) v^T
    zsum = tl.zeros([BLOCK_F], dtype=tl.float32)             # z = sum phi(k)
    if CAUSAL:
        for start in range(0, Nq, BLOCK_C):
            rows = start + offs_c
            q = _load_feat(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf, FEATURE)   # [BC, BF]
            k = _load_feat(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf, FEATURE)   # [BC, BF]
            v = _load_f32(v_base, rows, Nk, stride_vn, offs_v, V_DIM, stride_vd)             # [BC, BV]
            a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                              # [BC, BC]
            a = tl.where(rows[:, None] >= rows[None, :], a, 0.0)
            num = tl.dot(q, state, input_precision=DOT_PREC) + tl.dot(a, v, input_precision=DOT_PREC)
            den = tl.sum(q * zsum[None, :], 1) + tl.sum(a, 1) + eps                            # [BC]
            r_ok = rows < Nq
            tl.store(o_base + rows[:, None].to(tl.int64) * stride_on + offs_v[None, :] * stride_od,
                     (num / den[:, None]).to(O.dtype.element_ty), mask=r_ok[:, None] & (offs_v[None, :] < V_DIM))
            tl.store(den_base + rows, den, mask=rows < den_rows)
            state += tl.dot(tl.trans(k), v, input_precision=DOT_PREC)
            zsum += tl.sum(k, 0)
    else:
        for start in range(0, Nk, BLOCK_C):
            rows = start + offs_c
            k = _load_feat(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf, FEATURE)
            v = _load_f32(v_base, rows, Nk, stride_vn, offs_v, V_DIM, stride_vd)
            state += tl.dot(tl.trans(k), v, input_precision=DOT_PREC)
            zsum += tl.sum(k, 0)
        for start in range(0, Nq, BLOCK_C):
            rows = start + offs_c
            q = _load_feat(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf, FEATURE)
            num = tl.dot(q, state, input_precision=DOT_PREC)
            den = tl.sum(q * zsum[None, :], 1) + eps
            r_ok = rows < Nq
            tl.store(o_base + rows[:, None].to(tl.int64) * stride_on + offs_v[None, :] * stride_od,
                     (num / den[:, None]).to(O.dtype.element_ty), mask=r_ok[:, None] & (offs_v[None, :] < V_DIM))
            tl.store(den_base + rows, den, mask=rows < den_rows)


# --------------------------------------------------------------------------------------------- backward


@triton.jit
def _la_bwd_dq(
    Q, K, V, DO, DEN, GD, DQ,
    stride_qb, stride_qh, stride_qn, stride_qf,
    stride_kb, stride_kh, stride_kn, stride_kf,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqf,
    H, Nq, Nk, N_KEY,
    F_DIM: tl.constexpr, V_DIM: tl.constexpr, PAD_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)     # [BF] feature tile
    offs_dv = tl.arange(0, BLOCK_DV)                     # [BDV] full value dim
    offs_c = tl.arange(0, BLOCK_C)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    g_base = DO + b64 * stride_gb + h64 * stride_gh
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh
    row_base = (b64 * H + h64) * Nq
    state = tl.zeros([BLOCK_DV, BLOCK_F], dtype=tl.float32)  # sum v phi(k)^T (feature tile)
    zsum = tl.zeros([BLOCK_F], dtype=tl.float32)
    if CAUSAL:
        for start in range(0, Nq, BLOCK_C):
            rows = start + offs_c
            r_ok = rows < Nq
            k = _load_feat(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf, FEATURE)   # [BC, BF]
            v = _load_f32(v_base, rows, Nk, stride_vn, offs_dv, V_DIM, stride_vd)            # [BC, BDV]
            den = tl.load(DEN + row_base + rows, mask=r_ok, other=1.0)
            gd = tl.load(GD + row_base + rows, mask=r_ok, other=0.0)
            gn = _load_f32(g_base, rows, Nq, stride_gn, offs_dv, V_DIM, stride_gd) / den[:, None]  # [BC, BDV]
            dphi = tl.dot(gn, state, input_precision=DOT_PREC) + gd[:, None] * zsum[None, :]      # [BC, BF]
            a = tl.dot(gn, tl.trans(v), input_precision=DOT_PREC) + gd[:, None]                   # [BC, BC]
            a = tl.where(rows[:, None] >= rows[None, :], a, 0.0)
            dphi += tl.dot(a, k, input_precision=DOT_PREC)
            qraw = _load_f32(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf)
            dq = dphi * _dphi(qraw, FEATURE)
            tl.store(dq_base + rows[:, None].to(tl.int64) * stride_dqn + offs_f[None, :] * stride_dqf,
                     dq.to(DQ.dtype.element_ty), mask=r_ok[:, None] & (offs_f[None, :] < F_DIM))
            state += tl.dot(tl.trans(v), k, input_precision=DOT_PREC)
            zsum += tl.sum(k, 0)
    else:
        for start in range(0, Nk, BLOCK_C):
            rows = start + offs_c
            k = _load_feat(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf, FEATURE)
            v = _load_f32(v_base, rows, Nk, stride_vn, offs_dv, V_DIM, stride_vd)
            state += tl.dot(tl.trans(v), k, input_precision=DOT_PREC)
            zsum += tl.sum(k, 0)
        for start in range(0, Nq, BLOCK_C):
            rows = start + offs_c
            r_ok = rows < Nq
            den = tl.load(DEN + row_base + rows, mask=r_ok, other=1.0)
            gd = tl.load(GD + row_base + rows, mask=r_ok, other=0.0)
            gn = _load_f32(g_base, rows, Nq, stride_gn, offs_dv, V_DIM, stride_gd) / den[:, None]
            dphi = tl.dot(gn, state, input_precision=DOT_PREC) + gd[:, None] * zsum[None, :]
            qraw = _load_f32(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf)
            dq = dphi * _dphi(qraw, FEATURE)
            tl.store(dq_base + rows[:, None].to(tl.int64) * stride_dqn + offs_f[None, :] * stride_dqf,
                     dq.to(DQ.dtype.element_ty), mask=r_ok[:, None] & (offs_f[None, :] < F_DIM))


@triton.jit
def _la_bwd_dk(
    Q, K, V, DO, DEN, GD, DK,
    stride_qb, stride_qh, stride_qn, stride_qf,
    stride_kb, stride_kh, stride_kn, stride_kf,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkf,
    H, Nq, Nk, N_KEY,
    F_DIM: tl.constexpr, V_DIM: tl.constexpr, PAD_F: tl.constexpr, BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)     # [BF]
    offs_dv = tl.arange(0, BLOCK_DV)                     # [BDV]
    offs_c = tl.arange(0, BLOCK_C)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    g_base = DO + b64 * stride_gb + h64 * stride_gh
    dk_base = DK + b64 * stride_dkb + h64 * stride_dkh
    row_base = (b64 * H + h64) * Nq
    r1 = tl.zeros([BLOCK_F, BLOCK_DV], dtype=tl.float32)   # sum phi(q) gn^T over later queries
    r2 = tl.zeros([BLOCK_F], dtype=tl.float32)             # sum gd phi(q)
    if CAUSAL:
        n_chunks = tl.cdiv(Nk, BLOCK_C)
        for c in range(0, n_chunks):
            rows = (n_chunks - 1 - c) * BLOCK_C + offs_c
            r_ok = rows < Nq
            q = _load_feat(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf, FEATURE)   # [BC, BF]
            den = tl.load(DEN + row_base + rows, mask=r_ok, other=1.0)
            gd = tl.load(GD + row_base + rows, mask=r_ok, other=0.0)
            gn = _load_f32(g_base, rows, Nq, stride_gn, offs_dv, V_DIM, stride_gd) / den[:, None]  # [BC, BDV]
            v = _load_f32(v_base, rows, Nk, stride_vn, offs_dv, V_DIM, stride_vd)                   # [BC, BDV]
            dphi = tl.dot(v, tl.trans(r1), input_precision=DOT_PREC) + r2[None, :]                 # [BC, BF]
            e = tl.dot(v, tl.trans(gn), input_precision=DOT_PREC) + gd[None, :]                    # [BC(j), BC(i)]
            e = tl.where(rows[None, :] >= rows[:, None], e, 0.0)
            dphi += tl.dot(e, q, input_precision=DOT_PREC)
            kraw = _load_f32(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf)
            dk = dphi * _dphi(kraw, FEATURE)
            tl.store(dk_base + rows[:, None].to(tl.int64) * stride_dkn + offs_f[None, :] * stride_dkf,
                     dk.to(DK.dtype.element_ty), mask=(rows[:, None] < Nk) & (offs_f[None, :] < F_DIM))
            r1 += tl.dot(tl.trans(q), gn, input_precision=DOT_PREC)
            r2 += tl.sum(q * gd[:, None], 0)
    else:
        for start in range(0, Nq, BLOCK_C):
            rows = start + offs_c
            r_ok = rows < Nq
            q = _load_feat(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf, FEATURE)
            den = tl.load(DEN + row_base + rows, mask=r_ok, other=1.0)
            gd = tl.load(GD + row_base + rows, mask=r_ok, other=0.0)
            gn = _load_f32(g_base, rows, Nq, stride_gn, offs_dv, V_DIM, stride_gd) / den[:, None]
            r1 += tl.dot(tl.trans(q), gn, input_precision=DOT_PREC)
            r2 += tl.sum(q * gd[:, None], 0)
        for start in range(0, Nk, BLOCK_C):
            rows = start + offs_c
            v = _load_f32(v_base, rows, Nk, stride_vn, offs_dv, V_DIM, stride_vd)
            dphi = tl.dot(v, tl.trans(r1), input_precision=DOT_PREC) + r2[None, :]
            kraw = _load_f32(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf)
            dk = dphi * _dphi(kraw, FEATURE)
            tl.store(dk_base + rows[:, None].to(tl.int64) * stride_dkn + offs_f[None, :] * stride_dkf,
                     dk.to(DK.dtype.element_ty), mask=(rows[:, None] < Nk) & (offs_f[None, :] < F_DIM))


@triton.jit
def _la_bwd_dv(
    Q, K, DO, DEN, DV,
    stride_qb, stride_qh, stride_qn, stride_qf,
    stride_kb, stride_kh, stride_kn, stride_kf,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Nq, Nk, N_KEY,
    F_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_F: tl.constexpr, PAD_V: tl.constexpr,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    offs_f = tl.arange(0, BLOCK_F)                      # [BF] full feature dim
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)    # [BV]
    offs_c = tl.arange(0, BLOCK_C)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    k_base = K + b64 * stride_kb + h64 * stride_kh
    g_base = DO + b64 * stride_gb + h64 * stride_gh
    dv_base = DV + b64 * stride_dvb + h64 * stride_dvh
    row_base = (b64 * H + h64) * Nq
    r = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)   # sum phi(q) gn^T over later queries
    if CAUSAL:
        n_chunks = tl.cdiv(Nk, BLOCK_C)
        for c in range(0, n_chunks):
            rows = (n_chunks - 1 - c) * BLOCK_C + offs_c
            r_ok = rows < Nq
            q = _load_feat(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf, FEATURE)   # [BC, BF]
            k = _load_feat(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf, FEATURE)   # [BC, BF]
            den = tl.load(DEN + row_base + rows, mask=r_ok, other=1.0)
            gn = _load_f32(g_base, rows, Nq, stride_gn, offs_v, V_DIM, stride_gd) / den[:, None]  # [BC, BV]
            a = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)                                  # [BC(j), BC(i)]
            a = tl.where(rows[None, :] >= rows[:, None], a, 0.0)
            dv = tl.dot(k, r, input_precision=DOT_PREC) + tl.dot(a, gn, input_precision=DOT_PREC)
            tl.store(dv_base + rows[:, None].to(tl.int64) * stride_dvn + offs_v[None, :] * stride_dvd,
                     dv.to(DV.dtype.element_ty), mask=(rows[:, None] < Nk) & (offs_v[None, :] < V_DIM))
            r += tl.dot(tl.trans(q), gn, input_precision=DOT_PREC)
    else:
        for start in range(0, Nq, BLOCK_C):
            rows = start + offs_c
            r_ok = rows < Nq
            q = _load_feat(q_base, rows, Nq, stride_qn, offs_f, F_DIM, stride_qf, FEATURE)
            den = tl.load(DEN + row_base + rows, mask=r_ok, other=1.0)
            gn = _load_f32(g_base, rows, Nq, stride_gn, offs_v, V_DIM, stride_gd) / den[:, None]
            r += tl.dot(tl.trans(q), gn, input_precision=DOT_PREC)
        for start in range(0, Nk, BLOCK_C):
            rows = start + offs_c
            k = _load_feat(k_base, rows, Nk, stride_kn, offs_f, F_DIM, stride_kf, FEATURE)
            dv = tl.dot(k, r, input_precision=DOT_PREC)
            tl.store(dv_base + rows[:, None].to(tl.int64) * stride_dvn + offs_v[None, :] * stride_dvd,
                     dv.to(DV.dtype.element_ty), mask=(rows[:, None] < Nk) & (offs_v[None, :] < V_DIM))


_la_fwd_tuned = _autotuned(_la_fwd, "BLOCK_V", "BLOCK_F")
_la_bwd_dq_tuned = _autotuned(_la_bwd_dq, "BLOCK_F", "BLOCK_DV")
_la_bwd_dk_tuned = _autotuned(_la_bwd_dk, "BLOCK_F", "BLOCK_DV")
_la_bwd_dv_tuned = _autotuned(_la_bwd_dv, "BLOCK_V", "BLOCK_F")


# --------------------------------------------------------------------------------------------- launchers


def dot_precision(dtype: torch.dtype) -> str:
    """Every dot here multiplies fp32 tiles: fp32 inputs get the package's fp32 choice (IEEE in the
    interpreter, tf32x3 on GPUs), fp16 / bf16 inputs TF32 (about the precision of the inputs themselves)."""
    return _fp32_precision(torch.float32) if dtype == torch.float32 else "tf32"


def supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels take these shapes (the whole feature / value dim must fit one tile)."""
    return next_pow2(q.shape[-1]) <= MAX_FEATURE_BLOCK and next_pow2(v.shape[-1]) <= MAX_FEATURE_BLOCK


def _run(tuned, plain, grid, args, kwargs, interp_meta, tile_name):
    if tuned is None or not autotune_enabled():
        if _INTERPRET:
            metas = [dict(interp_meta, num_warps=4, num_stages=1)]
        else:  # GPU without autotuning: chunks of 64 and tiles of <= 64, smaller if shared memory is short
            t = interp_meta[tile_name]
            metas = [{"BLOCK_C": c, tile_name: min(tt, t), "num_warps": 4, "num_stages": 1}
                     for c, tt in ((64, 64), (32, 64), (32, 32), (16, 32), (16, 16))]
        key = (plain.__name__, args[0].dtype, args[0].device.index, tuple(sorted(kwargs.items())))
        launch_first_fitting(plain, grid, args, kwargs, metas, key)
    else:
        tuned[grid](*args, **kwargs)


def la_fwd(q, k, v, feature_map: str, causal: bool, eps: float):
    """Returns (out [B, H, Nq, Dv] in v.dtype, den [B, H, Nq] fp32 with eps included)."""
    B, H, Nq, Fd = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    out = torch.empty((B, H, Nq, Dv), device=q.device, dtype=v.dtype)
    den = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if min(B, H, Nq) == 0:
        return out, den
    pad_f, pad_v = next_pow2(Fd), next_pow2(Dv)
    kwargs = dict(F_DIM=Fd, V_DIM=Dv, BLOCK_F=pad_f, PAD_V=pad_v, FEATURE=FEATURE_CODES[feature_map],
                  CAUSAL=bool(causal), DOT_PREC=dot_precision(q.dtype))
    args = (q, k, v, out, den, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Nq, Nk, float(eps),
            next_pow2(max(Nq, Nk)))
    _run(_la_fwd_tuned, _la_fwd, lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), H, B), args, kwargs,
         dict(BLOCK_C=16, BLOCK_V=pad_v), "BLOCK_V")
    return out, den


def la_bwd(grad_out, q, k, v, out, den, feature_map: str, causal: bool):
    B, H, Nq, Fd = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if min(B, H, Nq, Nk) == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # gd_i = -(dO_i . O_i) / D_i  (fp32, [B, H, Nq])
    gd = (-(grad_out.float() * out.float()).sum(-1) / den).contiguous()
    den = den.contiguous()
    pad_f, pad_v = next_pow2(Fd), next_pow2(Dv)
    code = FEATURE_CODES[feature_map]
    prec = dot_precision(q.dtype)
    nkey = next_pow2(max(Nq, Nk))
    common = dict(F_DIM=Fd, V_DIM=Dv, FEATURE=code, CAUSAL=bool(causal), DOT_PREC=prec)
    for tuned, plain, target in ((_la_bwd_dq_tuned, _la_bwd_dq, dq), (_la_bwd_dk_tuned, _la_bwd_dk, dk)):
        _run(tuned, plain, lambda m: (triton.cdiv(Fd, m["BLOCK_F"]), H, B),
             (q, k, v, grad_out, den, gd, target, *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
              *target.stride(), H, Nq, Nk, nkey),
             dict(common, PAD_F=pad_f, BLOCK_DV=pad_v), dict(BLOCK_C=16, BLOCK_F=pad_f), "BLOCK_F")
    _run(_la_bwd_dv_tuned, _la_bwd_dv, lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), H, B),
         (q, k, grad_out, den, dv, *q.stride(), *k.stride(), *grad_out.stride(), *dv.stride(), H, Nq, Nk, nkey),
         dict(common, BLOCK_F=pad_f, PAD_V=pad_v), dict(BLOCK_C=16, BLOCK_V=pad_v), "BLOCK_V")
    return dq, dk, dv
