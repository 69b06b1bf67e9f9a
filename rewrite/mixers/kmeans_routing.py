"""K-means routing attention (Routing Transformer), with centroids fitted on calibration q/k.

Each kv head has ``clusters`` unit centroids, fitted by spherical k-means on L2-normalised calibration
queries and keys (``fit(q, k)``: no gradients; centroids are buffers, as the Routing Transformer keeps
them). At run time:

* every cluster takes the ``window`` keys most similar to its centroid (balanced on the key side: a
  fixed-size window per cluster; clusters may share keys);
* every query joins its nearest centroid's cluster (no query is dropped or sent elsewhere) and attends,
  with exact softmax, to that cluster's keys plus its own key (so no row is ever empty).

For fixed shapes the queries are sorted by cluster into blocks of ``Bq`` slots, each block holding one
cluster's queries; a block scores only its cluster's ``window`` keys. Time
O((N + clusters·Bq)·window·d + N·clusters·d), memory O(N·window), whatever the cluster sizes.
It equals exact attention with one cluster and ``window >= N``. On CPU without gradients (``_fused``) the
queries are instead sorted by cluster and each (head, cluster) is one fused-kernel call of all its queries
against its window: no padding slots, and the long query tiles the kernel is efficient on. Where the C++ kernel of
``rewrite.kernels.cluster_attention`` is built (the default), it serves those calls instead, key-padding masks
included: per (head, cluster) the window is gathered once into a cache-resident tile, and the cluster's queries
run through it in row tiles with their own key as one more column, their outputs written in token order.

Causal sites route so that nothing depends on a later token (choosing each cluster's window among all keys
would let a later key push an earlier one out): every key joins its nearest centroid's cluster, and a query
attends to the ``window`` most recent keys of its cluster at or before its position, plus its own key. Time
O(N·window·d + N·clusters·d). Sites whose mask is causal only at run time (a decoder's causal-and-padding
mask) are recognised on the example batch and routed causally too.

Until ``fit`` has been called, the first real batch the module sees fits the centroids (inside
``rewrite.optimize`` that is the example batch).

Example::

    model = rewrite.optimize(model, {"_default": rewrite.KMeansRouting(clusters=4, window=128)}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import sympy
import torch
import torch.nn.functional as F

from ..actions import Action, register_action, register_handler
from ..cost import B, H, N, Nk, d
from . import _layout
from . import _dense
from . import _masks
from . import _base
from ..kernels import cluster_attention


@register_action
@dataclasses.dataclass(frozen=True)
class KMeansRouting(Action):
    """Cluster-routed attention: ``clusters`` k-means centroids, ``window`` keys per cluster."""

    reads_example_mask = True

    clusters: int = 4
    window: int = 128
    iterations: int = 20
    exact = False
    requires = (_base.SelfAttention("k-means routing clusters queries and keys of one sequence"),)

    def __post_init__(self):
        _base.check_int(self, "clusters", self.clusters, 1, "Give the number of k-means centroids, e.g. clusters=4.")
        _base.check_int(self, "window", self.window, 1, "Give the keys each cluster attends to, e.g. window=128.")
        _base.check_int(self, "iterations", self.iterations, 1, "Give the k-means iterations used by fit, e.g. 20.")

    def flops(self) -> sympy.Expr:
        """Similarities of q and k to the centroids, then attention over ``window`` keys + the own key, for each
        of the N queries (the CPU path sorts queries by cluster: no padding slots)."""
        kept = sympy.Min(self.window, Nk) + 1
        routing = 2 * B * H * (N + Nk) * self.clusters * d
        return _layout.attention_flops(N, kept) + routing


TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


class KMeansRoutingAttention(_base.SDPAMixer):
    """SDPA-signature k-means routed attention. Buffer: ``centroids [Hkv, C, D]`` (empty until fitted)."""

    __name__ = "kmeans_routing_attention"

    def __init__(self, clusters: int = 4, window: int = 128, causal: bool = False, iterations: int = 20,
                 max_samples: int = 8192, seed: int = 0):
        super().__init__()
        self.clusters, self.window, self.causal = int(clusters), int(window), bool(causal)
        self.iterations, self.max_samples, self.seed = int(iterations), int(max_samples), int(seed)
        self.register_buffer("centroids", torch.zeros(0))  # [Hkv, C, D] once fitted

    @property
    def fitted(self) -> bool:
        """Whether centroids are there (from ``fit``, a first batch, or a loaded state dict)."""
        return self.centroids.numel() > 0

    def _config(self) -> dict:
        return {"clusters": self.clusters, "window": self.window, "causal": self.causal, "fitted": self.fitted}

    # ---------------------------------------------------------------------------------------- calibration
    @torch.no_grad()
    def fit(self, q: TensorOrList, k: TensorOrList) -> "KMeansRoutingAttention":
        """Fit per-kv-head centroids on calibration queries ``[..., Hq, N, D]`` and keys ``[..., Hkv, N, D]``.

        Lists of tensors (several calibration batches) are pooled. Spherical k-means with a deterministic
        k-means++ start; at most ``max_samples`` vectors per head (evenly strided) are used.
        """
        qs = [q] if isinstance(q, torch.Tensor) else list(q)
        ks = [k] if isinstance(k, torch.Tensor) else list(k)
        hkv = ks[0].shape[-3] if ks[0].dim() >= 4 else 1
        samples = []
        for t in qs + ks:
            t = t.detach().float()
            if t.dim() == 3:
                t = t.unsqueeze(-3)
            h = t.shape[-3]
            if h % hkv:
                raise ValueError(f"fit: {h} heads is not a multiple of {hkv} key/value heads")
            t = t.reshape(-1, hkv, h // hkv, t.shape[-2], t.shape[-1])        # [Bf, Hkv, G, N, D]
            samples.append(t.permute(1, 0, 2, 3, 4).reshape(hkv, -1, t.shape[-1]))
        x = F.normalize(torch.cat(samples, 1), dim=-1)                         # [Hkv, S, D]
        if x.shape[1] > self.max_samples:
            keep = torch.linspace(0, x.shape[1] - 1, self.max_samples, device=x.device).round().long()
            x = x[:, keep]
        self._set_centroids(_spherical_kmeans(x, self.clusters, self.iterations, self.seed))
        return self

    def _set_centroids(self, mu: torch.Tensor) -> None:
        self.centroids = mu.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Fitted centroids load into a fresh (unfitted, empty) module: take the saved shape first."""
        saved = state_dict.get(prefix + "centroids")
        if saved is not None and saved.shape != self.centroids.shape:
            self.centroids = torch.empty(saved.shape, dtype=saved.dtype, device=self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------- routing
    @torch.no_grad()
    def route(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """Routing in the grouped layout (q ``[Bf, Hkv, G, N, D]``, k ``[Bf, Hkv, Nk, D]``).

        Returns ``cluster [Bf, Hkv, G, N]`` (each query's nearest centroid) and ``kidx [Bf, Hkv, C, w]``
        (the keys of each cluster, most similar first).
        """
        mu = self.centroids
        if _layout.has_no_data(q) and not _layout.has_no_data(mu):  # shape inference / tracing of a fitted module
            from torch._guards import detect_fake_mode
            mu = detect_fake_mode((q,)).from_tensor(mu)
        mu = mu.to(q.dtype)                                                   # [Hkv, C, D]
        # cosine similarities, each column divided by its norm after the product (F.normalize's clamp at 1e-12):
        # [C, N] divisions instead of [N, D]; a query's nearest centroid does not depend on its own norm. The
        # products are centroids times tokens ([C, D] @ [D, N]): ten times faster on CPU than tokens times
        # centroids, whose output rows are C wide, and the keys' top-k then runs along a contiguous dim
        bf, hkv, g, n, dd = q.shape
        simq = mu.unsqueeze(0) @ q.reshape(bf, hkv, g * n, dd).transpose(-1, -2)   # [Bf, Hkv, C, G·N]
        simk = (mu.unsqueeze(0) @ k.transpose(-1, -2)).div_(
            torch.linalg.vector_norm(k, dim=-1).clamp_(min=1e-12).unsqueeze(-2))  # [Bf, Hkv, C, Nk]
        kidx = simk.topk(min(self.window, k.shape[-2]), dim=-1).indices
        return nearest(simq).view(bf, hkv, g, n), kidx

    def _is_fitted_for(self, c: _layout.Canon) -> bool:
        bf, hkv, g, n, _, dd, _ = c.dims
        return tuple(self.centroids.shape) == (hkv, self.clusters, dd)

    def _ensure_fitted(self, c: _layout.Canon) -> None:
        """Fit on this batch when ``fit`` was never called (or was called for another head layout)."""
        if not self._is_fitted_for(c):
            bf, hkv, g, n, _, dd, _ = c.dims
            self.fit(c.q.reshape(bf, hkv * g, n, dd), c.k)

    @torch.no_grad()
    def route_causal(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """Causal routing in the grouped layout (q ``[Bf, Hkv, G, N, D]``, k ``[Bf, Hkv, N, D]``).

        Returns ``kidx [Bf, Hkv, G, N, w]`` (each query's window: the ``w`` most recent keys of its cluster at
        or before its position, oldest first) and ``valid`` (False where the cluster has fewer such keys)."""
        mu = self.centroids
        if _layout.has_no_data(q) and not _layout.has_no_data(mu):
            from torch._guards import detect_fake_mode
            mu = detect_fake_mode((q,)).from_tensor(mu)
        mu = mu.to(q.dtype)
        bf, hkv, g, n, _ = q.shape
        nc, w = self.clusters, min(self.window, k.shape[-2])
        qc = _dense.grouped_scores(F.normalize(q, dim=-1), mu.unsqueeze(0)).argmax(-1)       # [Bf, Hkv, G, N]
        kc = (F.normalize(k, dim=-1) @ mu.transpose(-1, -2).unsqueeze(0)).argmax(-1)    # [Bf, Hkv, N]
        seen = F.one_hot(kc, nc).cumsum(-2)                                             # [Bf, Hkv, N, C]
        counts = seen[..., -1, :]
        start = counts.cumsum(-1) - counts                                              # each cluster's first slot
        pos = torch.arange(n, device=q.device)
        order = (kc * n + pos).argsort(-1)                                # keys sorted by (cluster, position)
        mine = seen.unsqueeze(2).expand(bf, hkv, g, n, nc).gather(-1, qc.unsqueeze(-1)).squeeze(-1)
        first = start.unsqueeze(2).expand(bf, hkv, g, nc).gather(-1, qc)                 # [Bf, Hkv, G, N]
        rank = mine.unsqueeze(-1) - w + torch.arange(w, device=q.device)                 # rank in the cluster
        valid = rank >= 0
        slot = (first.unsqueeze(-1) + rank.clamp(min=0)).clamp(max=n - 1)
        kidx = order.unsqueeze(2).expand(bf, hkv, g, n).gather(-1, slot.reshape(bf, hkv, g, n * w))
        return kidx.view(bf, hkv, g, n, w), valid

    def allowed(self, q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Bool ``[Bf, Hq, N, Nk]``: which keys each query attends to (its cluster's keys and its own key)."""
        c = _layout.canon(q, k, k, None, None)
        bf, hkv, g, n, nk, _, _ = c.dims
        self._ensure_fitted(c)
        if causal:
            kidx, valid = self.route_causal(c.q, c.k)
            allow = torch.zeros(bf, hkv, g, n, nk + 1, dtype=torch.bool, device=q.device)
            allow.scatter_(-1, kidx.masked_fill(~valid, nk), True)
            allow = allow[..., :nk] | torch.eye(n, nk, dtype=torch.bool, device=q.device)
            return allow.reshape(bf, hkv * g, n, nk)
        cluster, kidx = self.route(c.q, c.k)
        member = torch.zeros(bf, hkv, self.clusters, nk, dtype=torch.bool, device=q.device).scatter_(-1, kidx, True)
        allow = member.unsqueeze(2).expand(bf, hkv, g, self.clusters, nk).gather(
            3, cluster.unsqueeze(-1).expand(bf, hkv, g, n, nk))                # [Bf, Hkv, G, N, Nk]
        allow = allow | torch.eye(n, nk, dtype=torch.bool, device=q.device)
        return allow.reshape(bf, hkv * g, n, nk)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = _layout.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, n, nk, dd, dv = c.dims
        if n != nk:
            raise ValueError(f"KMeansRoutingAttention needs as many queries as keys (got {n} and {nk})")
        if _layout.has_no_data(c.q) and not self._is_fitted_for(c):
            # shape inference before any real batch: nothing to route with yet, and nothing to fit on
            return c.finish(c.q.new_zeros(bf, hkv, g, n, dv))
        self._ensure_fitted(c)
        if self.causal or bool(is_causal):
            return c.finish(self._causal(c, dropout_p))
        nc = self.clusters
        cluster, kidx = self.route(c.q, c.k)                                  # [Bf,Hkv,G,N], [Bf,Hkv,C,w]
        servable, key_bias = _dense.kernel_key_mask(c)
        if servable and _dense.cpu_inference(c, dropout_p) and cluster_attention.available():
            out = cluster_attention.cluster_attention_forward(
                c.q.reshape(bf, hkv * g, n, dd), c.k, c.v, cluster.reshape(bf, hkv * g, n), kidx, c.scale,
                None if key_bias is None else key_bias.squeeze(2))
            return c.finish(out.view(bf, hkv, g, n, dv))
        if c.bias is None and _dense.flash_cpu_serves(c, dropout_p):
            return c.finish(self._fused(c, cluster, kidx))
        w = kidx.shape[-1]
        bq = _slot_block(n, nc)
        slot_q, slot_of, blk_c = slot_layout(cluster, nc, bq)                 # [L,S], [L,N], [L,nblk]
        nblk = blk_c.shape[-1]
        full = (bf, hkv, g)

        # queries in slots [Bf, Hkv, G, nblk, Bq, D] (slot N = an empty slot, zero query)
        qpad = F.pad(c.q, (0, 0, 0, 1))
        qs = torch.gather(qpad, 3, slot_q.unsqueeze(-1).expand(*full, -1, dd)).view(*full, nblk, bq, dd)
        # each block's keys: its cluster's window [Bf, Hkv, G, nblk, w, D]
        kflat = kidx.reshape(bf, hkv, nc * w, 1)
        ksel = torch.gather(c.k, 2, kflat.expand(-1, -1, -1, dd)).view(bf, hkv, 1, nc, w * dd)
        vsel = torch.gather(c.v, 2, kflat.expand(-1, -1, -1, dv)).view(bf, hkv, 1, nc, w * dv)
        bidx = blk_c.unsqueeze(-1)
        kb = torch.gather(ksel.expand(*full, nc, w * dd), 3, bidx.expand(*full, nblk, w * dd)).view(*full, nblk, w, dd)
        vb = torch.gather(vsel.expand(*full, nc, w * dv), 3, bidx.expand(*full, nblk, w * dv)).view(*full, nblk, w, dv)
        kpos = torch.gather(kidx.unsqueeze(2).expand(*full, nc, w), 3, bidx.expand(*full, nblk, w))
        scores = (qs @ kb.transpose(-1, -2)).mul_(c.scale)                     # [L, nblk, Bq, w]

        # each query's own key, as one extra column
        qpos = slot_q.view(*full, nblk, bq)
        own_pos = qpos.clamp(max=n - 1)
        kown = torch.gather(c.k.unsqueeze(2).expand(*full, nk, dd), 3,
                            own_pos.reshape(*full, -1, 1).expand(*full, nblk * bq, dd)).view(*full, nblk, bq, dd)
        vown = torch.gather(c.v.unsqueeze(2).expand(*full, nk, dv), 3,
                            own_pos.reshape(*full, -1, 1).expand(*full, nblk * bq, dv)).view(*full, nblk, bq, dv)
        own = (qs * kown).sum(-1, keepdim=True).mul_(c.scale)                  # [L, nblk, Bq, 1]

        kp, qp = kpos.unsqueeze(-2), qpos.unsqueeze(-1)
        scores = scores.masked_fill(kp == qp, _layout.NEG_INF)                      # the own key is counted once
        if c.bias is not None:
            rows = own_pos.unsqueeze(-1)
            scores = scores + _dense.gather_bias(c.bias, full, rows, kp)
            own = own + _dense.gather_bias(c.bias, full, rows, rows)
        probs = _dense.dropout(_dense.safe_softmax(torch.cat([scores, own], -1)), dropout_p)
        out = probs[..., :w] @ vb + probs[..., w:] * vown                      # [L, nblk, Bq, Dv]
        out = torch.gather(out.reshape(*full, nblk * bq, dv), 3, slot_of.unsqueeze(-1).expand(*full, n, dv))
        return c.finish(out)


    @staticmethod
    def _fused(c: _layout.Canon, cluster: torch.Tensor, kidx: torch.Tensor) -> torch.Tensor:
        """The bidirectional form on the fused CPU kernel (``_dense.flash_cpu_serves``), ``[Bf, Hkv, G, N, Dv]``.

        The queries of each head are sorted by cluster (one gather); each (head, cluster) is then one kernel call
        of all that cluster's queries against its ``w`` keys, a view of the clusters' gathered windows: no query
        slot is padding and the kernel works on long query tiles (its tiles for a short "head", such as a block of
        128 slots, are half as efficient). Each query's own key joins through the row's log-sum-exp (the kernel's
        second output), unless the cluster's window already holds it."""
        bf, hkv, g, n, _, dd, dv = c.dims
        nc, w = kidx.shape[-2], kidx.shape[-1]
        dev, heads = c.q.device, bf * hkv * g
        lead = torch.arange(bf * hkv, device=dev).view(bf, hkv, 1, 1)
        kflat = (lead * n + kidx).reshape(-1)                                   # every cluster's window
        ksel = c.k.reshape(bf * hkv * n, dd).index_select(0, kflat).view(bf * hkv, nc, 1, 1, w, dd)
        vsel = c.v.reshape(bf * hkv * n, dv).index_select(0, kflat).view(bf * hkv, nc, 1, 1, w, dv)
        order = torch.sort(cluster.reshape(heads, n), dim=-1, stable=True).indices      # queries by cluster
        head = torch.arange(heads, device=dev).view(heads, 1)
        rows, vrows = (head * n + order).reshape(-1), (head // g * n + order).reshape(-1)
        qs = _layout.index_rows(c.q.reshape(heads * n, dd), rows, "kmeans_routing.q")
        vs = _layout.index_rows(c.v.reshape(bf * hkv * n, dv), vrows, "kmeans_routing.v")
        counts = torch.zeros(heads, nc, dtype=torch.long, device=dev).scatter_add_(
            1, cluster.reshape(heads, n), torch.ones_like(order)).tolist()              # [heads][C]
        # each query's own key score, -inf where its cluster's window holds it already (counted there, once)
        # (row-wise dot products as a batch of 1×D @ D×1 products: 4× faster on CPU than a product and a sum)
        kk = c.k.unsqueeze(2).expand(bf, hkv, g, n, dd).reshape(heads * n, dd, 1)
        own = torch.bmm(c.q.reshape(heads * n, 1, dd), kk).view(bf, hkv, g, n).mul_(c.scale)
        member = torch.zeros(bf, hkv, nc, n, dtype=torch.bool, device=dev).scatter_(-1, kidx, True)
        in_window = member.unsqueeze(2).expand(bf, hkv, g, nc, n).gather(3, cluster.unsqueeze(3)).squeeze(3)
        own = own.masked_fill_(in_window, _layout.NEG_INF).view(-1).index_select(0, rows)
        merged = _layout.scratch_or_empty("kmeans_routing.out", (heads * n, dv), c.q)  # in cluster order
        start = 0
        for h, sizes in enumerate(counts):
            for cl, size in enumerate(sizes):
                if size:
                    seg = slice(start, start + size)
                    o, lse = _dense.FLASH_CPU(qs[seg].view(1, 1, size, dd), ksel[h // g, cl], vsel[h // g, cl],
                                              scale=c.scale)
                    share = (own[seg] - lse.view(size)).sigmoid_().unsqueeze(-1)    # the own key's probability
                    torch.lerp(o.view(size, dv), vs[seg], share, out=merged[seg])
                start += size
        back = torch.empty_like(rows).scatter_(0, rows, torch.arange(heads * n, device=dev))   # token order
        return merged.index_select(0, back).view(bf, hkv, g, n, dv)

    def _causal(self, c: _layout.Canon, dropout_p) -> torch.Tensor:
        """Causal routed attention ``[Bf, Hkv, G, N, Dv]`` (see :meth:`route_causal`), in chunks of query rows."""
        bf, hkv, g, _, nk, dd, dv = c.dims
        kidx, valid = self.route_causal(c.q, c.k)
        w = kidx.shape[-1]
        full = (bf, hkv, g)
        keys = c.k.unsqueeze(2).expand(*full, nk, dd)
        vals = c.v.unsqueeze(2).expand(*full, nk, dv)
        outs = []
        for rows in _dense.row_chunks(c, per_row=bf * hkv * g * (w + 1) * max(dd, dv)):
            r = rows.stop - rows.start
            ki = kidx[..., rows, :]                                            # [Bf, Hkv, G, R, w]
            flat = ki.reshape(*full, r * w, 1)
            kb = torch.gather(keys, 3, flat.expand(*full, r * w, dd)).view(*full, r, w, dd)
            vb = torch.gather(vals, 3, flat.expand(*full, r * w, dv)).view(*full, r, w, dv)
            qr = c.q[..., rows, :]
            scores = (qr.unsqueeze(-2) @ kb.transpose(-1, -2)).squeeze(-2).mul_(c.scale)        # [.., R, w]
            own = (qr * c.k[:, :, None, rows, :]).sum(-1, keepdim=True).mul_(c.scale)          # [.., R, 1]
            qpos = torch.arange(rows.start, rows.stop, device=c.q.device).view(1, 1, 1, r, 1)
            scores = scores.masked_fill(~valid[..., rows, :] | (ki == qpos), _layout.NEG_INF)   # own key counted once
            if c.bias is not None:
                scores = scores + _dense.gather_bias(c.bias, full, qpos, ki)
                own = own + _dense.gather_bias(c.bias, full, qpos, qpos)
            probs = _dense.dropout(_dense.safe_softmax(torch.cat([scores, own], -1)), dropout_p)
            outs.append((probs[..., None, :w] @ vb).squeeze(-2) + probs[..., w:] * c.v[:, :, None, rows, :])
        return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]


def nearest(sim: torch.Tensor) -> torch.Tensor:
    """``sim.argmax(-2)`` for similarities ``[..., C, N]``: with few centroids, a running comparison of C rows
    (a reduction down the strided C dim is several times slower on CPU). Ties go to the first centroid."""
    nc = sim.shape[-2]
    if nc > 16:
        return sim.argmax(-2)
    best, idx = sim[..., 0, :], torch.zeros(sim.shape[:-2] + sim.shape[-1:], dtype=torch.long, device=sim.device)
    for cl in range(1, nc):
        better = sim[..., cl, :] > best
        idx.masked_fill_(better, cl)
        best = torch.maximum(best, sim[..., cl, :])
    return idx


def _slot_block(n, clusters):
    """Query slots per block: up to 128, fewer when clusters are small (padding is under one block each)."""
    if isinstance(n, int):
        return max(1, min(128, -(-n // (2 * clusters))))
    return sympy.Min(128, sympy.ceiling(n / (2 * clusters)))


def slot_layout(cluster: torch.Tensor, nc: int, bq: int) -> tuple:
    """Sort queries by cluster into blocks of ``bq`` slots, every block holding one cluster's queries.

    ``cluster [..., N]``. Returns ``slot_q [..., S]`` (the query in each slot; ``N`` = empty),
    ``slot_of [..., N]`` (each query's slot) and ``blk_c [..., S // bq]`` (each block's cluster), with
    ``S = (ceil(N / bq) + nc) * bq`` whatever the cluster sizes.
    """
    *lead, n = cluster.shape
    dev = cluster.device
    onehot = F.one_hot(cluster, nc)                                            # [..., N, C]
    counts = onehot.sum(-2)                                                    # [..., C]
    blocks = (counts + bq - 1) // bq
    first = blocks.cumsum(-1) - blocks                                         # first block of each cluster
    rank = onehot.cumsum(-2).gather(-1, cluster.unsqueeze(-1)).squeeze(-1) - 1  # rank within its cluster
    slot_of = first.gather(-1, cluster) * bq + rank                            # [..., N]
    nblk = -(-n // bq) + nc
    slot_q = torch.full((*lead, nblk * bq), n, dtype=torch.long, device=dev)
    slot_q.scatter_(-1, slot_of, torch.arange(n, device=dev).expand(*lead, n))
    slot_c = torch.zeros(*lead, nblk * bq, dtype=torch.long, device=dev).scatter_(-1, slot_of, cluster)
    return slot_q, slot_of, slot_c.view(*lead, nblk, bq)[..., 0]


def _spherical_kmeans(x: torch.Tensor, nc: int, iterations: int, seed: int) -> torch.Tensor:
    """Unit centroids ``[Hkv, C, D]`` for unit vectors ``x [Hkv, S, D]`` (batched over heads)."""
    hkv, s, dd = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # k-means++ start (cosine distance), deterministic
    first = torch.randint(0, s, (hkv,), generator=gen).to(x.device)
    mu = x[torch.arange(hkv, device=x.device), first].unsqueeze(1)             # [Hkv, 1, D]
    for _ in range(1, nc):
        dist = (1 - (x @ mu.transpose(-1, -2)).amax(-1)).clamp(min=0)          # [Hkv, S]
        weights = dist + 1e-12
        pick = torch.multinomial(weights.cpu(), 1, generator=gen).squeeze(-1).to(x.device)
        mu = torch.cat([mu, x[torch.arange(hkv, device=x.device), pick].unsqueeze(1)], 1)
    for _ in range(iterations):
        assign = (x @ mu.transpose(-1, -2)).argmax(-1)                         # [Hkv, S]
        sums = torch.zeros_like(mu).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, dd), x)
        counts = torch.zeros(hkv, nc, device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
        new = F.normalize(sums, dim=-1)
        empty = counts == 0
        if bool(empty.any()):  # re-seed an empty cluster at the worst-served point
            worst = (x @ mu.transpose(-1, -2)).amax(-1).argmin(-1)             # [Hkv]
            new = torch.where(empty.unsqueeze(-1), x[torch.arange(hkv, device=x.device), worst].unsqueeze(1), new)
        if torch.allclose(new, mu):
            mu = new
            break
        mu = new
    return mu


@register_handler(KMeansRouting)
def kmeans_routing_handler(action: KMeansRouting, call, site):
    # a mask that hides every later key, built at run time (seen on the example batch), needs causal routing too
    causal = _base.site_causal(call, site) or _masks.hides_future(_masks.site_mask_plan(site, call.is_causal))
    return KMeansRoutingAttention(action.clusters, action.window, causal=causal, iterations=action.iterations)
