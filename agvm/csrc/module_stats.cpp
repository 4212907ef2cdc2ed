// AGVM's per-tensor statistics in one pass over the data, on a CPU (agvm/cpu_stats.py builds and loads it).
//
// For every tensor k of a measurement step, with x = G_a and y = G_b (flat float32):
//     derived:  y = x - 2 g          (= -(2 g - x) = -G_b: the caller flips the dot's sign)
//     precond:  r = 1 / (sqrt(beta2 v + w g^2) + eps),  x *= r,  y *= r     (AdamW: Alg. 2's sqrt(v_t) + eps)
//     out[k] = (x . y, x . x, y . y)
// Each element is read once (a, b or g, and v), nothing is written but the three sums. Work is cut into blocks
// of BLOCK elements; each block's sums are float64 and the blocks are added in order, so the result does not
// depend on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLOCK = 1 << 16;

template <bool Derived, bool Precond, bool HasV>
void block_sums(const float* a, const float* b, const float* g, const float* v, int64_t n, float beta2, float w,
                float eps, double* out) {
  // float32 sums over runs of SUB elements (vectorised, several independent accumulators), float64 across runs
  constexpr int64_t SUB = 512;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int64_t lo = 0; lo < n; lo += SUB) {
    const int64_t hi = std::min(lo + SUB, n);
    float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f;
#pragma omp simd reduction(+ : t0, t1, t2)
    for (int64_t i = lo; i < hi; ++i) {
      float x = a[i];
      float y = Derived ? x - 2.0f * b[i] : b[i];
      if (Precond) {
        float gi = g[i];
        float vt = (HasV ? beta2 * v[i] : 0.0f) + w * (gi * gi);
        float r = 1.0f / (std::sqrt(vt) + eps);
        x *= r;
        y *= r;
      }
      t0 += x * y;
      t1 += x * x;
      t2 += y * y;
    }
    s0 += t0;
    s1 += t1;
    s2 += t2;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
}

const float* ptr(const torch::Tensor& t, const char* what, int64_t k, int64_t n) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.is_contiguous() && t.numel() == n,
              "agvm stats kernel: ", what, " of tensor ", k, " must be a contiguous float32 CPU tensor of ", n,
              " elements");
  return t.data_ptr<float>();
}

}  // namespace

// a, b: one tensor per entry; g, v: empty lists, or one per entry (v entries of 0 elements: v_{t-1} = 0).
// beta2, w, eps: per entry (used with precond). Returns float64 [len(a), 3].
torch::Tensor module_stats_cpu(std::vector<torch::Tensor> a, std::vector<torch::Tensor> b,
                               std::vector<torch::Tensor> g, std::vector<torch::Tensor> v, std::vector<double> beta2,
                               std::vector<double> w, std::vector<double> eps, bool derived, bool precond) {
  const int64_t K = static_cast<int64_t>(a.size());
  TORCH_CHECK(static_cast<int64_t>(b.size()) == K, "agvm stats kernel: a and b differ in length");
  TORCH_CHECK(!precond || (static_cast<int64_t>(g.size()) == K && static_cast<int64_t>(v.size()) == K &&
                           static_cast<int64_t>(beta2.size()) == K && static_cast<int64_t>(w.size()) == K &&
                           static_cast<int64_t>(eps.size()) == K),
              "agvm stats kernel: precond needs g, v, beta2, w, eps per entry");
  struct Unit { int64_t k, lo, hi; };
  std::vector<Unit> units;
  std::vector<const float*> pa(K), pb(K), pg(K, nullptr), pv(K, nullptr);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = a[k].numel();
    pa[k] = ptr(a[k], "a", k, n);
    pb[k] = ptr(b[k], "b", k, n);
    if (precond) {
      pg[k] = ptr(g[k], "g", k, n);
      if (v[k].numel() > 0) pv[k] = ptr(v[k], "v", k, n);
    }
    for (int64_t lo = 0; lo < n; lo += BLOCK) units.push_back({k, lo, std::min(lo + BLOCK, n)});
  }
  std::vector<double> partial(units.size() * 3, 0.0);
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Unit& x = units[u];
      const int64_t k = x.k, lo = x.lo, n = x.hi - x.lo;
      double* out = partial.data() + 3 * u;
      const float* gk = pg[k] ? pg[k] + lo : nullptr;
      const float* vk = pv[k] ? pv[k] + lo : nullptr;
      const float b2 = precond ? static_cast<float>(beta2[k]) : 0.0f;
      const float wk = precond ? static_cast<float>(w[k]) : 0.0f;
      const float ek = precond ? static_cast<float>(eps[k]) : 0.0f;
      if (!precond) {
        if (derived) block_sums<true, false, false>(pa[k] + lo, pb[k] + lo, nullptr, nullptr, n, 0, 0, 0, out);
        else block_sums<false, false, false>(pa[k] + lo, pb[k] + lo, nullptr, nullptr, n, 0, 0, 0, out);
      } else if (vk) {
        if (derived) block_sums<true, true, true>(pa[k] + lo, pb[k] + lo, gk, vk, n, b2, wk, ek, out);
        else block_sums<false, true, true>(pa[k] + lo, pb[k] + lo, gk, vk, n, b2, wk, ek, out);
      } else {
        if (derived) block_sums<true, true, false>(pa[k] + lo, pb[k] + lo, gk, nullptr, n, b2, wk, ek, out);
        else block_sums<false, true, false>(pa[k] + lo, pb[k] + lo, gk, nullptr, n, b2, wk, ek, out);
      }
    }
  });
  auto result = torch::zeros({K, 3}, torch::kFloat64);
  double* r = result.data_ptr<double>();
  for (size_t u = 0; u < units.size(); ++u)
    for (int j = 0; j < 3; ++j) r[3 * units[u].k + j] += partial[3 * u + j];
  return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("module_stats_cpu", &module_stats_cpu, "AGVM's (dot, |a|^2, |b|^2) per tensor in one pass (float32, CPU)");
}
