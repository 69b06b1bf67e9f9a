"""Plain-PyTorch linear attention: the CPU path of ``rewrite::linear_attention`` and the oracles.

With feature map ``phi`` (applied to queries and keys):

    out_i = sum_{j in S(i)} (phi(q_i) . phi(k_j)) v_j  /  (sum_{j in S(i)} phi(q_i) . phi(k_j) + eps)

where ``S(i) = {j <= i}`` when causal (then Nq == Nk) and all keys otherwise. Feature maps:

* ``"elu"``: ``elu(x) + 1`` (Katharopoulos et al., 2020);
* ``"relu"``: ``relu(x)``;
* ``"favor"``: Performer FAVOR+ positive random features (Choromanski et al., 2021) with a projection
  ``W`` [m, D] passed in: ``phi(x) = exp(W x' - |x'|^2 / 2 - c) / sqrt(m)`` with ``x' = x * D**-0.25``
  (so ``phi(q).phi(k)`` estimates ``exp(q.k / sqrt(D))``). The stabiliser ``c`` is the (detached) max of
  ``W x'`` over the features of each query row, and over all positions and features of each (batch, head)
  for keys; it cancels in the normalised output (up to ``eps``). ``favor_projection`` draws ``W``.
* ``"identity"``: ``phi(x) = x`` (inputs are already features).

Two references: ``linear_attention_quadratic`` (materialises the [Nq, Nk] matrix; the oracle) and
``linear_attention_chunked`` (O(N) memory state recurrence over chunks; the CPU path).
Both compute in float32 and return ``v.dtype``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["FEATURE_MAPS", "feature_map", "favor_features", "favor_projection", "linear_attention_quadratic",
           "linear_attention_chunked", "linear_attention_chunked_backward"]

FEATURE_MAPS = ("elu", "relu", "favor", "identity")


def orthogonal_gaussian(rows: int, dim: int, seed: int | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``[rows, dim]`` fp32 block-orthogonal Gaussian directions with chi-distributed norms (Performer's ORF),
    drawn from ``generator`` or a fresh one seeded with ``seed``."""
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed or 0))
    blocks = []
    for _ in range(-(-rows // dim)):
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        qmat, r = torch.linalg.qr(a)
        blocks.append((qmat * torch.sign(torch.diagonal(r)).unsqueeze(0)).T)
    w = torch.cat(blocks, dim=0)[:rows]
    norms = torch.randn(rows, dim, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (w * norms).to(torch.float32)


def favor_log(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Log of FAVOR+ positive features: ``φ(x)_r = exp(ω_r·x - |x|²/2) / √m``, so E[φ(q)·φ(k)] = exp(q·k)."""
    m = proj.shape[0]
    # one pass over the [N, m] product (in place: a product's backward needs only its inputs), and |x|² without
    # an [N, D] temporary
    half_sq = 0.5 * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()
    return (x @ proj.to(x.dtype).T).sub_(half_sq + 0.5 * math.log(m))


def favor_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """FAVOR+ positive random features of ``x`` [..., N, D] with ``projection`` [m, D] -> [..., N, m] fp32,
    for softmax(q·kᵀ/√D): both sides scaled by D^-1/4, shifted by a maximum (per query row, or over all keys)
    that cancels in the normalised output."""
    logs = favor_log(x.float() * x.shape[-1] ** -0.25, projection.float().to(x.device))
    stab = logs.detach().amax(dim=-1 if is_query else (-2, -1), keepdim=True)
    return torch.exp(logs - stab)


def favor_projection(num_features: int, dim: int, generator: torch.Generator | None = None,
                     orthogonal: bool = True, device=None) -> torch.Tensor:
    """A FAVOR+ projection [num_features, dim]: :func:`orthogonal_gaussian` rows when ``orthogonal``, i.i.d.
    N(0, 1) rows otherwise."""
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator).to(device)
    return orthogonal_gaussian(num_features, dim, generator=generator).to(device)


def linear_causal(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor, offset: int = 0,
                  chunk: int = 64) -> torch.Tensor:
    """``out_i = fq_i · Σ_{j <= i + offset} fk_j v1_jᵀ`` in chunks: O(N·(C·m + C·dv + m·dv)).

    Keys before ``offset`` (a KV cache) form the starting state; the remaining ``Nq`` keys are aligned
    with the queries and processed chunk by chunk (exact inside a chunk, a prefix state across chunks).
    """
    nq, nk = fq.shape[-2], fk.shape[-2]
    if offset < 0 or nk - offset != nq:
        raise ValueError(f"linear_causal needs 0 <= offset == Nk - Nq (got offset {offset}, Nq {nq}, Nk {nk})")
    lead = torch.broadcast_shapes(fq.shape[:-2], fk.shape[:-2], v1.shape[:-2])
    m, dv = fq.shape[-1], v1.shape[-1]
    fq, fk, v1 = fq.expand(*lead, nq, m), fk.expand(*lead, nk, m), v1.expand(*lead, nk, dv)
    state0 = None
    if offset > 0:
        state0 = fk[..., :offset, :].transpose(-1, -2) @ v1[..., :offset, :]
        fk, v1 = fk[..., offset:, :], v1[..., offset:, :]
    if nq == 0:
        return fq.new_zeros(*lead, 0, dv)
    c = max(1, min(chunk, nq))
    nc = -(-nq // c)
    pad = nc * c - nq
    if pad:
        fq, fk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v1))
    fq, fk, v1 = fq.reshape(*lead, nc, c, m), fk.reshape(*lead, nc, c, m), v1.reshape(*lead, nc, c, dv)
    tri = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    intra = (fq @ fk.transpose(-1, -2)).masked_fill(~tri, 0.0) @ v1
    states = fk.transpose(-1, -2) @ v1                      # [..., nc, m, dv]
    before = states.cumsum(dim=-3) - states                 # exclusive prefix over chunks
    if state0 is not None:
        before = before + state0.unsqueeze(-3)
    out = (intra + fq @ before).reshape(*lead, nc * c, dv)
    return out[..., :nq, :]


def feature_map(x: torch.Tensor, name: str, projection: torch.Tensor | None = None,
                is_query: bool = True) -> torch.Tensor:
    """phi(x) in float32 for the named feature map."""
    if name == "elu":
        return F.elu(x.float()) + 1.0
    if name == "relu":
        return F.relu(x.float())
    if name == "identity":
        return x.float()
    if name == "favor":
        if projection is None:
            raise ValueError("feature_map='favor' needs a projection matrix [m, D]")
        return favor_features(x, projection, is_query)
    raise ValueError(f"unknown feature map {name!r}; expected one of {FEATURE_MAPS}")


def _features(q, k, name, projection):
    return feature_map(q, name, projection, True), feature_map(k, name, projection, False)


def linear_attention_quadratic(q, k, v, feature_map_name: str = "elu", projection=None, causal: bool = False,
                               eps: float = 1e-6, return_den: bool = False):
    """The quadratic form: A = phi(q) phi(k)^T (lower-triangular when causal), out = A v / (rowsum(A) + eps)."""
    fq, fk = _features(q, k, feature_map_name, projection)
    a = torch.matmul(fq, fk.transpose(-1, -2))
    if causal:
        a = a * torch.ones(a.shape[-2:], device=a.device, dtype=torch.bool).tril()
    den = a.sum(-1) + eps
    out = (torch.matmul(a, v.float()) / den[..., None]).to(v.dtype)
    return (out, den) if return_den else out


def linear_attention_chunked(q, k, v, feature_map_name: str = "elu", projection=None, causal: bool = False,
                             eps: float = 1e-6, chunk_size: int = 64, return_den: bool = False):
    """The chunked form: a running state S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j) across chunks, and the
    masked quadratic form inside each chunk (causal). O(N * chunk) memory."""
    fq, fk = _features(q, k, feature_map_name, projection)
    vf = v.float()
    if not causal:
        s = torch.matmul(fk.transpose(-1, -2), vf)             # [B, H, F, Dv]
        z = fk.sum(-2)                                         # [B, H, F]
        num = torch.matmul(fq, s)
        den = (fq * z[..., None, :]).sum(-1) + eps
        out = (num / den[..., None]).to(v.dtype)
        return (out, den) if return_den else out
    if k.shape[-2] != q.shape[-2]:
        raise ValueError("causal linear attention needs Nq == Nk")
    num1 = linear_causal(fq, fk, torch.cat([vf, torch.ones_like(vf[..., :1])], dim=-1), 0, chunk_size)
    den = num1[..., -1] + eps
    out = (num1[..., :-1] / den[..., None]).to(v.dtype)
    return (out, den) if return_den else out


def _feature_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """d phi / dx for the elementwise feature maps (fp32)."""
    x = x.float()
    if name == "elu":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(torch.clamp(x, max=0.0)))
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "identity":
        return torch.ones_like(x)
    raise ValueError(f"no elementwise derivative for feature map {name!r}")


def linear_attention_chunked_backward(grad_out, q, k, v, out, den, feature_map_name: str, causal: bool,
                                      chunk_size: int = 64):
    """(dq, dk, dv) of ``linear_attention_chunked`` for the elementwise feature maps, written out (the CPU
    backward of the op runs where autograd recording is off) with the kernels' algebra: gn = dO / D,
    gd = -(dO . O) / D, then dphi(q) / dphi(k) / dv by chunked state recurrences (reverse order for dk, dv)."""
    fq, fk = _features(q, k, feature_map_name, None)
    vf, g = v.float(), grad_out.float()
    gn = g / den[..., None]
    gd = -(g * out.float()).sum(-1) / den
    if not causal:
        s2 = torch.matmul(vf.transpose(-1, -2), fk)                   # [B, H, Dv, F]
        dphi_q = torch.matmul(gn, s2) + gd[..., None] * fk.sum(-2)[..., None, :]
        r1 = torch.matmul(fq.transpose(-1, -2), gn)                   # [B, H, F, Dv]
        r2 = (gd[..., None] * fq).sum(-2)                             # [B, H, F]
        dphi_k = torch.matmul(vf, r1.transpose(-1, -2)) + r2[..., None, :]
        dv = torch.matmul(fk, r1)
    else:
        n = q.shape[-2]
        tril = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        s2 = vf.new_zeros(*vf.shape[:-2], vf.shape[-1], fk.shape[-1])
        z = fk.new_zeros(*fk.shape[:-2], fk.shape[-1])
        dq_chunks = []
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            t = tril[: end - start, : end - start]
            gnc, gdc, vc, kc = gn[..., start:end, :], gd[..., start:end], vf[..., start:end, :], fk[..., start:end, :]
            a = (torch.matmul(gnc, vc.transpose(-1, -2)) + gdc[..., None]) * t
            dq_chunks.append(torch.matmul(gnc, s2) + gdc[..., None] * z[..., None, :] + torch.matmul(a, kc))
            s2 = s2 + torch.matmul(vc.transpose(-1, -2), kc)
            z = z + kc.sum(-2)
        dphi_q = torch.cat(dq_chunks, -2)
        r1 = fq.new_zeros(*fq.shape[:-2], fq.shape[-1], vf.shape[-1])
        r2 = fq.new_zeros(*fq.shape[:-2], fq.shape[-1])
        dk_chunks, dv_chunks = [], []
        starts = list(range(0, n, chunk_size))
        for start in reversed(starts):
            end = min(n, start + chunk_size)
            tu = tril[: end - start, : end - start].t()       # [j, i]: i >= j
            qc, gnc, gdc = fq[..., start:end, :], gn[..., start:end, :], gd[..., start:end]
            vc, kc = vf[..., start:end, :], fk[..., start:end, :]
            e = (torch.matmul(vc, gnc.transpose(-1, -2)) + gdc[..., None, :]) * tu
            dk_chunks.append(torch.matmul(vc, r1.transpose(-1, -2)) + r2[..., None, :] + torch.matmul(e, qc))
            a2 = torch.matmul(kc, qc.transpose(-1, -2)) * tu
            dv_chunks.append(torch.matmul(kc, r1) + torch.matmul(a2, gnc))
            r1 = r1 + torch.matmul(qc.transpose(-1, -2), gnc)
            r2 = r2 + (gdc[..., None] * qc).sum(-2)
        dphi_k = torch.cat(dk_chunks[::-1], -2)
        dv = torch.cat(dv_chunks[::-1], -2)
    dq = dphi_q * _feature_grad(q, feature_map_name)
    dk = dphi_k * _feature_grad(k, feature_map_name)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
