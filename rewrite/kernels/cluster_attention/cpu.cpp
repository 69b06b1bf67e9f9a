// Cluster attention on CPU (KMeansRouting's bidirectional form): every query attends to its cluster's window of
// keys plus its own key. The semantics are those of reference.py.
//
// Per (sequence, cluster): the window's keys and values are gathered once into a tile that stays in cache, the
// cluster's queries go through it in chunks of rows (long query tiles, no padding slots), the own key is one more
// column of each row's softmax, and the output rows are written where their tokens are: no sort, gather, merge or
// unsort passes over q/v-sized tensors.
#include "cpu_common.h"

using namespace rewrite_cpu;

namespace {
constexpr int64_t kRowsPerTile = 128;
}

// q [A, Hq, N, D]; k [A, Hkv, N, D], v [A, Hkv, N, Dv] (any strides but a unit last one; query head h reads kv head
// h / (Hq / Hkv)); cluster [A, Hq, N] int64 (each query's cluster, 0 <= c < C); window [A, Hkv, C, w] int64 (the
// keys of each cluster); key_bias [A|1, Hq|1, N] float32, additive per key (a key-padding mask), or none.
// Returns out [A, Hq, N, Dv].
torch::Tensor cluster_attention_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        const torch::Tensor& cluster, const torch::Tensor& window,
                                        const c10::optional<torch::Tensor>& key_bias, double scale) {
  check_row_tensors("cluster_attention", {&q, &k, &v});
  const int64_t A = q.size(0), hq = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), dv = v.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && k.size(0) == A && k.size(2) == n && k.size(3) == d && v.size(0) == A &&
              v.size(1) == hkv && v.size(2) == n, "cluster_attention: q, k, v shapes disagree (N queries, N keys)");
  TORCH_CHECK(cluster.dtype() == torch::kInt64 && cluster.is_contiguous() && cluster.dim() == 3 &&
              cluster.size(0) == A && cluster.size(1) == hq && cluster.size(2) == n,
              "cluster_attention: cluster must be contiguous int64 [A, Hq, N]");
  TORCH_CHECK(window.dtype() == torch::kInt64 && window.is_contiguous() && window.dim() == 4 &&
              window.size(0) == A && window.size(1) == hkv, "cluster_attention: window must be contiguous int64 [A, Hkv, C, w]");
  const int64_t nc = window.size(2), w = window.size(3), g = hq / hkv;
  const float* bp = nullptr;
  int64_t bs0 = 0, bs1 = 0, bs2 = 0;
  if (key_bias.has_value()) {
    TORCH_CHECK(key_bias->dtype() == torch::kFloat32 && key_bias->dim() == 3 && key_bias->size(2) == n &&
                (key_bias->size(0) == 1 || key_bias->size(0) == A) && (key_bias->size(1) == 1 || key_bias->size(1) == hq),
                "cluster_attention: key_bias must be float32 [A|1, Hq|1, N]");
    bp = key_bias->data_ptr<float>();
    bs0 = key_bias->size(0) > 1 ? key_bias->stride(0) : 0;
    bs1 = key_bias->size(1) > 1 ? key_bias->stride(1) : 0;
    bs2 = key_bias->stride(2);
  }
  auto out = torch::empty({A, hq, n, dv}, q.options());
  if (A * hq * n == 0) return out;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* cp = cluster.data_ptr<int64_t>();
  const int64_t* wp = window.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float alpha = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t width = w + 1;  // the window, then the own key
  at::parallel_for(0, A * hq * nc, 1, [&](int64_t g0, int64_t g1) {
    const OneBlasThread one_blas_thread;
    std::vector<float> keys(w * d), values(w * dv), qtile(kRowsPerTile * d), tile(kRowsPerTile * width),
        otile(kRowsPerTile * dv), sums(kRowsPerTile), window_bias(w);
    std::vector<char> member(n);
    std::vector<int64_t> rows;
    rows.reserve(n);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t seq = grp / nc, c = grp % nc, a = seq / hq, h = seq % hq, hk = h / g;
      const int64_t* cl = cp + seq * n;
      rows.clear();
      for (int64_t i = 0; i < n; ++i) {
        if (cl[i] == c) rows.push_back(i);
      }
      if (rows.empty()) continue;
      const float* kh = kp + a * ks0 + hk * ks1;
      const float* vh = vp + a * vs0 + hk * vs1;
      const int64_t* win = wp + ((a * hkv + hk) * nc + c) * w;
      std::fill(member.begin(), member.end(), 0);
      for (int64_t j = 0; j < w; ++j) {
        const int64_t key = win[j];
        TORCH_CHECK(key >= 0 && key < n, "cluster_attention: window index out of range");
        member[key] = 1;
        std::copy(kh + key * ks2, kh + key * ks2 + d, keys.data() + j * d);
        std::copy(vh + key * vs2, vh + key * vs2 + dv, values.data() + j * dv);
      }
      const float* brow = bp ? bp + a * bs0 + h * bs1 : nullptr;
      if (brow) {
        for (int64_t j = 0; j < w; ++j) window_bias[j] = brow[win[j] * bs2];
      }
      const float* qh = qp + a * qs0 + h * qs1;
      float* oh = op + (a * hq + h) * n * dv;
      for (size_t r0 = 0; r0 < rows.size(); r0 += kRowsPerTile) {
        const int m = static_cast<int>(std::min<int64_t>(kRowsPerTile, rows.size() - r0));
        for (int r = 0; r < m; ++r) std::copy(qh + rows[r0 + r] * qs2, qh + rows[r0 + r] * qs2 + d, qtile.data() + r * d);
        if (w) scores_gemm(m, w, d, alpha, qtile.data(), d, keys.data(), d, tile.data(), width);
        for (int r = 0; r < m; ++r) {
          const int64_t i = rows[r0 + r];
          float own = neg_inf;  // the own key, unless the window holds it (counted there, once)
          if (!member[i]) {
            const float* qi = qtile.data() + r * d;
            const float* ki = kh + i * ks2;
            own = alpha * at::vec::map2_reduce_all<float>([](Vec x, Vec y) { return x * y; },
                                                          [](Vec x, Vec y) { return x + y; }, qi, ki, d);
            if (brow) own += brow[i * bs2];
          }
          if (brow && w) {
            float* row = tile.data() + r * width;
            at::vec::map2<float>([](Vec x, Vec y) { return x + y; }, row, row, window_bias.data(), w);
          }
          tile[r * width + w] = own;
          sums[r] = softmax_numerators(tile.data() + r * width, width);
        }
        if (w) values_gemm(m, dv, w, tile.data(), width, values.data(), dv, 0.f, otile.data(), dv);
        else std::fill(otile.begin(), otile.begin() + m * dv, 0.f);
        for (int r = 0; r < m; ++r) {
          const int64_t i = rows[r0 + r];
          const float p_own = tile[r * width + w];
          const float inv = sums[r] > 0.f ? 1.f / sums[r] : 0.f;
          const float* vi = vh + i * vs2;
          const float* orow = otile.data() + r * dv;
          float* dst = oh + i * dv;
          at::vec::map2<float>([p_own, inv](Vec o, Vec x) { return (o + x * Vec(p_own)) * Vec(inv); }, dst, orow,
                               vi, dv);
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cluster_attention_forward", &cluster_attention_forward, "cluster attention (see reference.py)");
}
