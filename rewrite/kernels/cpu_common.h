// Shared pieces of the C++ CPU kernels (rewrite/kernels/*/cpu.cpp): BLAS products on row-major tiles and the
// softmax numerators of a score row.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// BLAS (MKL in the x86 wheels of torch, exported by libtorch_cpu); column-major, hence the swapped operands below.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
// MKL's per-thread thread count: each worker's GEMMs must run on that worker alone (weak: other BLAS lack it)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace rewrite_cpu {

using Vec = at::vec::Vectorized<float>;

// While alive, this thread's BLAS calls run on this thread alone (a parallel_for worker must not start BLAS threads
// of its own); restores the thread's setting when it ends, thrown errors included.
class OneBlasThread {
 public:
  OneBlasThread() : saved_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(saved_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int saved_;
};

// q, k, v (and any more) as float32 [A, H, N, D] with rows of unit stride: what the kernels index by pointer
inline void check_row_tensors(const char* op, std::initializer_list<const torch::Tensor*> tensors) {
  for (const torch::Tensor* x : tensors) {
    TORCH_CHECK(x->dtype() == torch::kFloat32 && x->dim() == 4 && x->stride(3) == 1, op,
                ": float32 [A, H, N, D] tensors with a unit last stride expected");
  }
}

// row-major C[m x n] (ld ldc) = alpha * A[m x k] (ld lda) . B[n x k]^T (ld ldb)
inline void scores_gemm(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb, float* c,
                 int ldc) {
  const float zero = 0.f;
  sgemm_("T", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &zero, c, &ldc);
}

// row-major C[m x n] (ld ldc) = A[m x k] (ld lda) . B[k x n] (ld ldb) + beta * C
inline void values_gemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
                 int ldc) {
  const float one = 1.f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// key-major tiles: row-major C[n keys x m queries] (ld ldc) = alpha * (B[n x k] (ld ldb) . A[k x m] (ld lda)), from
// the queries transposed (A = q^T) and a key block as it lies (B)
inline void keys_gemm(int m, int n, int k, float alpha, const float* a_t, int lda, const float* b, int ldb, float* c,
                      int ldc) {
  const float zero = 0.f;
  sgemm_("N", "N", &m, &n, &k, &alpha, a_t, &lda, b, &ldb, &zero, c, &ldc);
}

// row-major O[m x n] (ld ldo) = P[m x k] . V[k x n] (ld ldv) + beta * O, with P given key-major (P^T, [k x m], ld ldp)
inline void weights_gemm(int m, int n, int k, const float* p_t, int ldp, const float* v, int ldv, float beta, float* o,
                         int ldo) {
  const float one = 1.f;
  sgemm_("N", "T", &n, &m, &k, &one, v, &ldv, p_t, &ldp, &beta, o, &ldo);
}

// softmax numerators of a key-major tile (rows 0 ... keys - 1, columns 0 ... queries - 1, ld ld), in place, one
// query per column; sums[r] gets each query's sum (0 for a query that sees no key, whose column is zeroed)
inline void softmax_numerators_by_column(float* tile, int64_t keys, int queries, int64_t ld, float* top, float* sums) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(top, top + queries, neg_inf);
  std::fill(sums, sums + queries, 0.f);
  if (keys == 0) return;
  for (int64_t c = 0; c < keys; ++c) {
    at::vec::map2<float>([](Vec x, Vec y) { return at::vec::maximum(x, y); }, top, top, tile + c * ld, queries);
  }
  for (int r = 0; r < queries; ++r) {
    if (top[r] == neg_inf) top[r] = std::numeric_limits<float>::infinity();  // exp(s - inf) = 0: a blind query
  }
  for (int64_t c = 0; c < keys; ++c) {
    float* row = tile + c * ld;
    int r = 0;
    for (; r + Vec::size() <= queries; r += Vec::size()) {
      Vec x = (Vec::loadu(row + r) - Vec::loadu(top + r)).exp_u20();
      x.store(row + r);
      (Vec::loadu(sums + r) + x).store(sums + r);
    }
    for (; r < queries; ++r) {
      row[r] = std::exp(row[r] - top[r]);
      sums[r] += row[r];
    }
  }
}

// exp(row - max) in place; returns the sum (0 for a row that sees no key, which is then zeroed)
inline float softmax_numerators(float* row, int64_t width) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float mx = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, row, width);
  if (mx == neg_inf) {
    std::fill(row, row + width, 0.f);
    return 0.f;
  }
  const Vec vmx(mx);
  Vec acc(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= width; c += Vec::size()) {
    Vec x = (Vec::loadu(row + c) - vmx).exp_u20();
    x.store(row + c);
    acc = acc + x;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; c < width; ++c) {
    row[c] = std::exp(row[c] - mx);
    sum += row[c];
  }
  return sum;
}

}  // namespace rewrite_cpu
