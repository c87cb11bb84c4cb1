// The lowest eigenpairs of many sparse symmetric items (graph components of up to ~16k nodes), one item per CPU
// thread at a time: single-vector Lanczos with partial reorthogonalisation that is never restarted.
//
// Why this shape (measurements in spectralkern/eigen/_auto.py): on 1024 blocks of 128 nodes, k = 16, the
// per-block cost of ARPACK through scipy is dominated by Python (a callback per product, the eigsh set-up) and
// batched torch kernels of this size run at a few GFLOP/s, so both stay near 2-3 ms per block. Here a small item's
// Krylov basis (m x n, m <= ~80 for k = 16) lives in L2 and every step is a compiled loop. On big items (4096
// nodes, k = 64: ~690 steps) a Gram-Schmidt pass against the whole basis every step was > 90% of the work;
// partial reorthogonalisation runs one on ~1 step in 30 there.
//
// Per item (n nodes, want pairs, K = min(want + guards, n) Ritz pairs tracked):
//   1. q_0 = the given start (a warm start) or uniform random; w = L q_j - alpha_j q_j - beta_{j-1} q_{j-1};
//      Simon's recurrence estimates q_{j+1}' q_k for all k, and only when an estimate exceeds sqrt(eps) (and on
//      the step after) w gets a classical Gram-Schmidt pass against all of V, repeated once when it cancelled
//      more than half of w ("twice is enough"); beta_j = |w|. A w that is rounding noise (an invariant subspace
//      was reached: repeated eigenvalues, the item exhausted) is replaced by a random direction orthogonal to V,
//      with beta_j = 0, so the Krylov space keeps growing until it spans the item: the method cannot fail to
//      converge.
//   2. At checkpoints: the K lowest eigenvalues of the tridiagonal T_j (bisection on Sturm counts, all K at once),
//      their eigenvectors by inverse iteration (re-orthogonalised inside clusters of close eigenvalues), the Ritz
//      residual estimates beta_j |s_i[j-1]|.
//   3. When all K estimates meet the tolerance: Ritz vectors y_i = V' s_i, one fresh product L y_i each, a
//      Rayleigh-Ritz step on span(y) (which makes the vectors orthonormal to rounding again) and the explicit
//      residuals |L u - theta u| as the verdict. A wanted pair that fails it sends the item back to step 1; under
//      partial reorthogonalisation it restarts the item with a full pass every step instead (the estimates are a
//      model of the rounding, not a bound), and so do tolerances below 0.1 sqrt(eps) |L|, which the Gram-Schmidt
//      coefficients partial reorthogonalisation leaves out of T_j would keep out of reach.
// Multiplicities inside one item are found as in any single-vector Lanczos (ARPACK included): through rounding
// and random refills. The caller gives each connected component its own item, so the repeated eigenvalues that
// disconnected components produce never have to be found that way.
#include "native.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace baseline {
#include "small_lanczos_impl.h"
}  // namespace baseline

// The same code for AVX2 + FMA (4 doubles per instruction instead of SSE2's 2): the Gram-Schmidt loops dominate.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECTRALKERN_HAVE_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
#include "small_lanczos_impl.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

bool use_avx2() {
#ifdef SPECTRALKERN_HAVE_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

template <typename T>
void solve_items(int64_t first_item, int64_t num_items, int64_t n_pad, const int64_t* sizes, const int64_t* node_map,
                 const int64_t* crow, const int64_t* col, const T* val, const int64_t* item_of,
                 const int64_t* local_of, const int64_t* want, int64_t kw, const T* start,
                 const baseline::Options& options, uint64_t seed, int threads, T* values, T* vectors,
                 double* residuals, int64_t* products) {
#ifdef SPECTRALKERN_HAVE_AVX2
  if (use_avx2()) {
    const avx2::Options same{options.tol,    options.norm,      options.eps,
                             options.guards, options.max_steps, options.semi_orthogonality};
    const avx2::Graph<T> graph{crow, col, val, item_of, local_of};
    avx2::solve_all<T>(first_item, num_items, n_pad, sizes, node_map, graph, want, kw, start, same, seed, threads,
                       values, vectors, residuals, products);
    return;
  }
#endif
  const baseline::Graph<T> graph{crow, col, val, item_of, local_of};
  baseline::solve_all<T>(first_item, num_items, n_pad, sizes, node_map, graph, want, kw, start, options, seed,
                         threads, values, vectors, residuals, products);
}

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <typename T>
void dispatch(int64_t first_item, int64_t num_items, int64_t n_pad, uintptr_t sizes, uintptr_t node_map,
              uintptr_t crow, uintptr_t col, uintptr_t val, const int64_t* item_of, const int64_t* local_of,
              uintptr_t want, int64_t kw, uintptr_t start, const baseline::Options& options, uint64_t seed, int threads,
              uintptr_t values, uintptr_t vectors, uintptr_t residuals, uintptr_t products) {
  solve_items<T>(first_item, num_items, n_pad, as_ptr<const int64_t>(sizes), as_ptr<const int64_t>(node_map),
                 as_ptr<const int64_t>(crow), as_ptr<const int64_t>(col), as_ptr<const T>(val),
                 item_of, local_of, as_ptr<const int64_t>(want), kw,
                 as_ptr<const T>(start), options, seed, threads, as_ptr<T>(values), as_ptr<T>(vectors),
                 as_ptr<double>(residuals), as_ptr<int64_t>(products));
}

}  // namespace

namespace spectralkern_native {

void lowest_eigenpairs(const std::string& dtype, int64_t num_nodes, int64_t first_item, int64_t num_items,
                       int64_t n_pad, uintptr_t sizes, uintptr_t node_map, uintptr_t crow, uintptr_t col,
                       uintptr_t val, uintptr_t want, int64_t kw, uintptr_t start, double tol, double norm,
                       int guards, int64_t max_steps, double semi_orthogonality, uint64_t seed, int threads,
                       uintptr_t values, uintptr_t vectors, uintptr_t residuals, uintptr_t products) {
  if (num_nodes < 0 || first_item < 0 || num_items < 0 || n_pad < 1 || kw < 0 || guards < 0 || max_steps < 1 ||
      threads < 1 || !(semi_orthogonality >= 0))
    throw std::invalid_argument("lowest_eigenpairs: bad sizes");
  // where each node of these items sits: its item and its row there (nodes of no item here: -1; no entry of L
  // joins two items, each a union of connected components)
  std::vector<int64_t> item_of(static_cast<size_t>(num_nodes), -1), local_of(static_cast<size_t>(num_nodes), 0);
  const int64_t* map = as_ptr<const int64_t>(node_map);
  for (int64_t g = first_item; g < first_item + num_items; ++g)
    for (int64_t r = 0; r < n_pad; ++r) {
      const int64_t node = map[g * n_pad + r];
      if (node < 0) continue;
      if (node >= num_nodes) throw std::invalid_argument("lowest_eigenpairs: node_map names a node past num_nodes");
      item_of[node] = g;
      local_of[node] = r;
    }
  const int steps_cap = static_cast<int>(std::min<int64_t>(max_steps, std::numeric_limits<int>::max()));
  if (dtype == "float64") {
    const baseline::Options options{tol, norm, std::numeric_limits<double>::epsilon() / 2, guards, steps_cap,
                                          semi_orthogonality};
    dispatch<double>(first_item, num_items, n_pad, sizes, node_map, crow, col, val, item_of.data(), local_of.data(),
                     want, kw,
                     start, options, seed, threads, values, vectors, residuals, products);
  } else if (dtype == "float32") {
    const baseline::Options options{tol, norm, std::numeric_limits<float>::epsilon() / 2, guards, steps_cap,
                                          semi_orthogonality};
    dispatch<float>(first_item, num_items, n_pad, sizes, node_map, crow, col, val, item_of.data(), local_of.data(),
                    want, kw,
                    start, options, seed, threads, values, vectors, residuals, products);
  } else {
    throw std::invalid_argument("lowest_eigenpairs: dtype must be 'float32' or 'float64', got " + dtype);
  }
}

}  // namespace spectralkern_native
