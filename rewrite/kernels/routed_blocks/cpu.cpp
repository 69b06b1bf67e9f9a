// Routed block attention on CPU: every query block attends to its own list of key blocks (plus extra keys of its
// head) in one tile, reading the key and value blocks where they lie. The semantics are those of reference.py.
//
// Why not torch's fused SDPA per query block: its CPU kernel runs a 64-query "head" on 32-row tiles at about half
// of its long-head speed, and the chosen blocks must first be gathered into one key tensor (a copy of every kept
// key and value). Here the scores of a query block against each chosen block are one small GEMM written into its
// rows of a key-major [keys, queries] tile, the softmax runs once over the whole tile (by column), and the output
// is one GEMM per block.
#include "cpu_common.h"

using namespace rewrite_cpu;

// q [A, Hq, N, D]; k [A, Hkv, Nk, D], v [A, Hkv, Nk, Dv] (any strides but a unit last one; query head h reads kv
// head h / (Hq / Hkv)); blocks [A, Hq, nb, t] int64: the key blocks of each query block. Block i covers the rows
// prefix + i*block ... (the last one may be short); extra_k [X, E, D], extra_v [X, E, Dv] (query block f =
// (a*Hq + h)*nb + i uses extras row f / extra_per); mask [M, nb|1, block|1, t*block + E] additive, any strides
// (query block f reads mask[f / nb if M > 1 else 0, i]); a block index -1 is no block (its columns are hidden).
// Writes rows prefix ... N-1 of out [A, Hq, N, Dv].
void routed_blocks_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& blocks, int64_t block, int64_t prefix,
                           const c10::optional<torch::Tensor>& extra_k, const c10::optional<torch::Tensor>& extra_v,
                           int64_t extra_per, const c10::optional<torch::Tensor>& mask, double scale,
                           torch::Tensor& out) {
  check_row_tensors("routed_blocks", {&q, &k, &v, &out});
  TORCH_CHECK(out.is_contiguous(), "routed_blocks: a contiguous out expected");
  const int64_t A = q.size(0), hq = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), nk = k.size(2), dv = v.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && k.size(0) == A && v.size(0) == A && v.size(1) == hkv && v.size(2) == nk &&
              k.size(3) == d && out.size(0) == A && out.size(1) == hq && out.size(2) == n && out.size(3) == dv,
              "routed_blocks: q, k, v, out shapes disagree");
  TORCH_CHECK(blocks.dtype() == torch::kInt64 && blocks.is_contiguous() && blocks.dim() == 4 &&
              blocks.size(0) == A && blocks.size(1) == hq, "routed_blocks: blocks must be contiguous int64 [A, Hq, nb, t]");
  const int64_t nb = blocks.size(2), t = blocks.size(3), g = hq / hkv;
  TORCH_CHECK(block > 0 && prefix >= 0 && prefix + (nb - 1) * block < std::max<int64_t>(n, prefix + 1) &&
              prefix + nb * block >= n, "routed_blocks: nb blocks of `block` rows after `prefix` must cover N");
  const bool has_extra = extra_k.has_value() && extra_k->size(1) > 0;
  const int64_t e = has_extra ? extra_k->size(1) : 0;
  if (has_extra) {
    TORCH_CHECK(extra_k->is_contiguous() && extra_v->is_contiguous() && extra_k->dtype() == torch::kFloat32 &&
                extra_v->dtype() == torch::kFloat32 && extra_per > 0 && extra_k->size(2) == d &&
                extra_v->size(2) == dv, "routed_blocks: contiguous float32 extras and a positive extra_per expected");
  }
  const int64_t width = t * block + e;
  const int64_t heads = A * hq * nb;
  if (heads == 0 || d == 0) return;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* ip = blocks.data_ptr<int64_t>();
  const float* ekp = has_extra ? extra_k->data_ptr<float>() : nullptr;
  const float* evp = has_extra ? extra_v->data_ptr<float>() : nullptr;
  const float* mp = nullptr;
  int64_t ms0 = 0, ms1 = 0, ms2 = 0, ms3 = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dtype() == torch::kFloat32 && mask->dim() == 4 && mask->size(3) == width &&
                (mask->size(1) == 1 || mask->size(1) == nb) && (mask->size(2) == 1 || mask->size(2) == block),
                "routed_blocks: mask must be float32 [M, nb|1, block|1, t*block + E]");
    mp = mask->data_ptr<float>();
    ms0 = mask->size(0) > 1 ? mask->stride(0) : 0;
    ms1 = mask->size(1) > 1 ? mask->stride(1) : 0;
    ms2 = mask->size(2) > 1 ? mask->stride(2) : 0;
    ms3 = mask->stride(3);
  }
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  float* op = out.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, heads, 1, [&](int64_t f0, int64_t f1) {
    const OneBlasThread one_blas_thread;
    // the tile is key-major, [width keys x block queries]: with the queries transposed once per query block, every
    // product is an untransposed GEMM (MKL runs 64 x 64 x 64 ones 23% faster than with the key block transposed)
    std::vector<float> tile(block * width), qt(d * block), top(block), sums(block);
    std::vector<int64_t> cols(t), starts(t), slot_of(t);
    float* s = tile.data();
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t seq = f / nb, i = f % nb, a = seq / hq, h = seq % hq, hk = h / g;
      const int64_t row0 = prefix + i * block;
      const int rows = static_cast<int>(std::min(block, n - row0));
      if (rows <= 0) continue;
      const float* qh = qp + a * qs0 + h * qs1 + row0 * qs2;
      const float* kh = kp + a * ks0 + hk * ks1;
      const float* vh = vp + a * vs0 + hk * vs1;
      const int64_t* picked = ip + f * t;
      // the kept picks only (-1: no block), laid side by side: a query block's tile is as wide as what it keeps
      int64_t kept = 0;
      for (int64_t j = 0; j < t; ++j) {
        if (picked[j] < 0) continue;
        const int64_t start = prefix + picked[j] * block;
        const int64_t c = std::max<int64_t>(0, std::min(block, nk - start));
        if (c == 0) continue;
        slot_of[kept] = j;
        starts[kept] = start;
        cols[kept++] = c;
      }
      const int64_t span = kept * block + e;  // the keys this query block sees, tile rows 0 ... span - 1
      at::vec::transpose_mxn<float>(qh, qs2, qt.data(), block, rows, static_cast<int>(d));
      for (int64_t x = 0; x < kept; ++x) {
        keys_gemm(rows, cols[x], d, alpha, qt.data(), block, kh + starts[x] * ks2, ks2, s + x * block * block, block);
        for (int64_t c = cols[x]; c < block; ++c) {  // a short (last) block: its missing keys are hidden
          std::fill(s + (x * block + c) * block, s + (x * block + c) * block + rows, neg_inf);
        }
      }
      const int64_t xr = has_extra ? f / extra_per : 0;
      if (has_extra) keys_gemm(rows, e, d, alpha, qt.data(), block, ekp + xr * e * d, d, s + kept * block * block, block);
      if (mp) {  // the mask's columns of each kept block, then of the extras
        const float* mh = mp + seq * ms0 + i * ms1;
        for (int64_t c = 0; c < span; ++c) {
          const int64_t x = c / block;
          const int64_t mc = x < kept ? slot_of[x] * block + c % block : t * block + (c - kept * block);
          float* dst = s + c * block;
          if (ms2 == 0) {
            const Vec m(mh[mc * ms3]);
            at::vec::map<float>([m](Vec p) { return p + m; }, dst, dst, rows);
          } else {
            for (int r = 0; r < rows; ++r) dst[r] += mh[r * ms2 + mc * ms3];
          }
        }
      }
      softmax_numerators_by_column(s, span, rows, block, top.data(), sums.data());
      float* oh = op + ((a * hq + h) * n + row0) * dv;
      bool written = false;
      for (int64_t x = 0; x < kept; ++x) {
        weights_gemm(rows, dv, cols[x], s + x * block * block, block, vh + starts[x] * vs2, vs2, written ? 1.f : 0.f,
                     oh, dv);
        written = true;
      }
      if (has_extra) {
        weights_gemm(rows, dv, e, s + kept * block * block, block, evp + xr * e * dv, dv, written ? 1.f : 0.f, oh, dv);
        written = true;
      }
      if (!written) std::fill(oh, oh + rows * dv, 0.f);
      for (int r = 0; r < rows; ++r) {
        const float inv = sums[r] > 0.f ? 1.f / sums[r] : 0.f;
        float* orow = oh + r * dv;
        at::vec::map<float>([inv](Vec x) { return x * Vec(inv); }, orow, orow, dv);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("routed_blocks_forward", &routed_blocks_forward, "routed block attention (see reference.py)");
}
