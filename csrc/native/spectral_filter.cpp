// The CPU spectral filter (spectralkern/ops/spectral_filter.py, the `native` backend): the kernel of
// spectral_filter_impl.h compiled three times — baseline (SSE2), AVX2 + FMA, AVX-512 — and picked at run time;
// blocks split across threads by rows.
#include "native.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace baseline {
#include "spectral_filter_impl.h"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPECTRALKERN_FILTER_SIMD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
namespace avx2 {
#include "spectral_filter_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma", "prefer-vector-width=512")
#pragma GCC optimize("fp-contract=fast")
namespace avx512 {
#include "spectral_filter_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

template <template <typename> class Args, typename T>
Args<T> make_args(const int64_t* block_ptr, int64_t d, int64_t k, uintptr_t x, uintptr_t U, uintptr_t gains,
                  double h, uintptr_t y, uintptr_t saved, uintptr_t gain_grad) {
  return Args<T>{block_ptr, d, k, reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(U),
                 reinterpret_cast<const T*>(gains), static_cast<T>(h), reinterpret_cast<T*>(y),
                 reinterpret_cast<const T*>(saved), reinterpret_cast<T*>(gain_grad)};
}

template <typename T>
void run_range(int64_t first, int64_t last, const int64_t* block_ptr, int64_t d, int64_t k, uintptr_t x, uintptr_t U,
               uintptr_t gains, double h, uintptr_t y, uintptr_t saved, uintptr_t gain_grad) {
#ifdef SPECTRALKERN_FILTER_SIMD
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx512) {
    avx512::filter_blocks(make_args<avx512::FilterArgs, T>(block_ptr, d, k, x, U, gains, h, y, saved, gain_grad),
                          first, last);
    return;
  }
  if (has_avx2) {
    avx2::filter_blocks(make_args<avx2::FilterArgs, T>(block_ptr, d, k, x, U, gains, h, y, saved, gain_grad),
                        first, last);
    return;
  }
#endif
  baseline::filter_blocks(make_args<baseline::FilterArgs, T>(block_ptr, d, k, x, U, gains, h, y, saved, gain_grad),
                          first, last);
}

template <typename T>
void run(int64_t num_blocks, const int64_t* block_ptr, int64_t d, int64_t k, uintptr_t x, uintptr_t U,
         uintptr_t gains, double h, uintptr_t y, uintptr_t saved, uintptr_t gain_grad, int threads) {
  const int64_t rows = block_ptr[num_blocks];
  // a thread is worth its start (~20 µs) above ~2^22 multiply-adds
  const int64_t work = rows * d * std::max<int64_t>(k, 1) * (saved ? 2 : 1);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, num_blocks, work >> 22})));
  if (threads <= 1) {
    run_range<T>(0, num_blocks, block_ptr, d, k, x, U, gains, h, y, saved, gain_grad);
    return;
  }
  // contiguous block ranges of about rows / threads rows each
  std::vector<std::thread> pool;
  int64_t first = 0;
  for (int t = 0; t < threads && first < num_blocks; ++t) {
    const int64_t target = rows * (t + 1) / threads;
    int64_t last = first;
    while (last < num_blocks && (block_ptr[last + 1] <= target || last == first)) ++last;
    if (t == threads - 1) last = num_blocks;
    pool.emplace_back(run_range<T>, first, last, block_ptr, d, k, x, U, gains, h, y, saved, gain_grad);
    first = last;
  }
  for (auto& thread : pool) thread.join();
}

constexpr int64_t kChunk = baseline::kChunk;

}  // namespace

namespace spectralkern_native {

void spectral_filter(const std::string& dtype, int64_t num_blocks, uintptr_t block_ptr, int64_t d, int64_t k,
                     uintptr_t x, uintptr_t U, uintptr_t gains, double h, uintptr_t y, uintptr_t saved,
                     uintptr_t gain_grad, int threads) {
  if (num_blocks < 0 || d < 0 || k < 0) throw std::invalid_argument("spectral_filter: negative size");
  if (k % kChunk != 0) throw std::invalid_argument("spectral_filter: k must be a multiple of 8 (pad U and gains)");
  const auto* ptr = reinterpret_cast<const int64_t*>(block_ptr);
  if (dtype == "float32") {
    run<float>(num_blocks, ptr, d, k, x, U, gains, h, y, saved, gain_grad, threads);
  } else if (dtype == "float64") {
    run<double>(num_blocks, ptr, d, k, x, U, gains, h, y, saved, gain_grad, threads);
  } else {
    throw std::invalid_argument("spectral_filter: dtype must be float32 or float64, got " + dtype);
  }
}

}  // namespace spectralkern_native
