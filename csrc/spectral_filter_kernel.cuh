// Fused spectral filter, y_b = h·x_b + U_b diag(g_b − h) U_bᵀ x_b, for all ragged blocks in one launch.
//
// One CUDA block per (graph block b, column tile of kTileD columns), 8 warps:
//   pass 1  C = U_bᵀ x_b  (K × kTileD): row chunks of kRows rows of U_b and x_b are staged in shared memory
//           (converted to fp32) and multiplied on tensor cores (wmma m16n16k8 TF32, fp32 accumulation); the next
//           chunk's global loads are issued before the current chunk's products so they overlap.
//   scale   C ← diag(g_b − h) C in shared memory (after the gains-gradient partials, which need C unscaled).
//   pass 2  y = h·x + U_b C, chunk by chunk: products into a shared staging tile, then h·x and the store.
// C never leaves the chip. fp32 inputs use 3xTF32 (a = a_hi + a_lo, three products; ≈ fp32 accuracy);
// fp16/bf16 inputs are exact in TF32, so one TF32 product per step rounds only U and C (≤ 2^-11 relative).
//
// Backward: the operator is symmetric, so grad_x is this kernel on grad_y. With gain_grad set, pass 1 also runs
// on the saved forward input and each CUDA block writes Σ_columns C ⊙ S per frequency for its tile.
//
// x loads/stores use 16-byte vectors when the host saw aligned pointers and row strides (template flag VEC),
// scalar accesses with arbitrary strides otherwise; partial vectors at the right edge fall back to scalar.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <string>
#include <type_traits>

#include "spectral_filter.h"

namespace spectralkern {
namespace detail {

using namespace nvcuda;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 32;                          // rows of a block per chunk
constexpr int kPad = 4;                            // floats of padding per shared row: keeps 16-byte alignment,
                                                   // shifts consecutive rows by 4 banks
constexpr int kLdx = kTileD + kPad;                // leading dimension of the x / staging / coefficient tiles
constexpr int kSlots = kRows * kTileD / kThreads;  // x elements each thread loads per chunk (8)
static_assert(kTileD % 16 == 0 && kRows % 16 == 0, "tiles are made of 16 x 16 fragments");
static_assert((kRows / 16) * (kTileD / 16) == kWarps, "pass 2 gives every warp one output fragment");

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

template <int K>
struct Config {
  static_assert(K % 16 == 0 && K <= kMaxK, "K is a multiple of 16, at most kMaxK");
  static constexpr int kLdu = K + kPad;
  static constexpr int kFrags = (K / 16) * (kTileD / 16);               // output fragments of pass 1
  static constexpr int kPerWarp = kFrags >= kWarps ? kFrags / kWarps : 1;
  static constexpr int kGroups = kFrags >= kWarps ? 1 : kWarps / kFrags;  // warps splitting one fragment's rows
  static constexpr int kUSlots = kRows * K / kThreads;                  // U elements each thread loads per chunk
  static constexpr int kUFloats = kRows * kLdu;
  static constexpr int kXFloats = kRows * kLdx;
  static constexpr int kCFloats = kGroups * K * kLdx;
  // Two CUDA blocks per SM cap registers at 128 per thread; K = 128 needs more (its 4 accumulator fragments per
  // warp spill heavily under that cap), so it runs one block of 8 warps per SM.
  static constexpr int kMinBlocksPerSM = K <= 64 ? 2 : 1;
  static_assert(kFrags % kWarps == 0 || kWarps % kFrags == 0, "fragments spread evenly over warps");
  static_assert((kRows / 8) % kGroups == 0, "row steps spread evenly over warp groups");

  static size_t smem_bytes(bool gain_grad) {
    return sizeof(float) * (kUFloats + kXFloats + kCFloats * (gain_grad ? 2 : 1));
  }
};

using FragA1 = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;  // U_bᵀ
using FragA2 = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;  // U_b
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

template <class Frag>
__device__ __forceinline__ void round_tf32(Frag& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

// hi holds fp32 values on entry; on exit hi = tf32(v) and lo = tf32(v − hi).
template <class Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    const float h = wmma::__float_to_tf32(v);
    hi.x[i] = h;
    lo.x[i] = wmma::__float_to_tf32(v - h);
  }
}

// acc += a · b from shared memory; SPLIT: 3xTF32 (small terms first), else one TF32 product.
template <bool SPLIT, class FragA>
__device__ __forceinline__ void mma_tf32(FragC& acc, const float* a, int lda, const float* b, int ldb) {
  FragA a_hi, a_lo;
  FragB b_hi, b_lo;
  wmma::load_matrix_sync(a_hi, a, lda);
  wmma::load_matrix_sync(b_hi, b, ldb);
  if constexpr (SPLIT) {
    split_tf32(a_hi, a_lo);
    split_tf32(b_hi, b_lo);
    wmma::mma_sync(acc, a_lo, b_hi, acc);
    wmma::mma_sync(acc, a_hi, b_lo, acc);
  } else {
    round_tf32(a_hi);
    round_tf32(b_hi);
  }
  wmma::mma_sync(acc, a_hi, b_hi, acc);
}

// ------------------------------------------------------------------------------------- element conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));  // elements in one 16-byte vector

template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    const T2* pairs = reinterpret_cast<const T2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f;
      if constexpr (std::is_same_v<T, __half>) {
        f = __half22float2(pairs[i]);
      } else {
        f = __bfloat1622float2(pairs[i]);
      }
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack16(const float* in) {
  uint4 raw;
  if constexpr (std::is_same_v<T, float>) {
    raw = make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    T2* pairs = reinterpret_cast<T2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, __half>) {
        pairs[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
      } else {
        pairs[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
      }
    }
  }
  return raw;
}

// ------------------------------------------------------------------------------------- x tiles <-> registers
// Thread `tid` owns kSlots elements of a kRows × kTileD chunk. VEC: kSlots / kVecElems whole 16-byte vectors
// (row-contiguous); scalar: elements tid, tid + kThreads, ... in row-major order (coalesced for unit column
// stride). Loads, shared stores and the epilogue use the same map, so a thread's x registers line up with the
// outputs it writes.
template <typename T, bool VEC>
__device__ __forceinline__ void slot_position(int tid, int slot, int& row, int& col) {
  if constexpr (VEC) {
    constexpr int kVecPerRow = kTileD / kVecElems<T>;
    const int v = tid + kThreads * (slot / kVecElems<T>);
    row = v / kVecPerRow;
    col = (v % kVecPerRow) * kVecElems<T> + slot % kVecElems<T>;
  } else {
    const int e = tid + kThreads * slot;
    row = e / kTileD;
    col = e % kTileD;
  }
}

// Loads rows [row0, row0 + rows) × columns [col0, col0 + cols) of src into registers; zeros elsewhere.
template <typename T, bool VEC>
__device__ __forceinline__ void load_x(float (&r)[kSlots], const T* __restrict__ src, int64_t s0, int64_t s1,
                                       int64_t row0, int rows, int64_t col0, int cols) {
  const int tid = threadIdx.x;
  if constexpr (VEC) {
    constexpr int kV = kVecElems<T>;
#pragma unroll
    for (int i = 0; i < kSlots / kV; ++i) {
      int row, col;
      slot_position<T, VEC>(tid, i * kV, row, col);
      const T* p = src + (row0 + row) * s0 + col0 + col;
      if (row < rows && col + kV <= cols) {
        unpack16<T>(*reinterpret_cast<const uint4*>(p), r + i * kV);
      } else {
#pragma unroll
        for (int e = 0; e < kV; ++e) r[i * kV + e] = (row < rows && col + e < cols) ? to_float(p[e]) : 0.0f;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      int row, col;
      slot_position<T, VEC>(tid, j, row, col);
      r[j] = (row < rows && col < cols) ? to_float(src[(row0 + row) * s0 + (col0 + col) * s1]) : 0.0f;
    }
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_x_shared(float* __restrict__ xs, const float (&r)[kSlots]) {
  const int tid = threadIdx.x;
  if constexpr (VEC) {
#pragma unroll
    for (int j = 0; j < kSlots; j += 4) {  // kVecElems is a multiple of 4: groups of 4 stay on one row
      int row, col;
      slot_position<T, VEC>(tid, j, row, col);
      *reinterpret_cast<float4*>(xs + row * kLdx + col) = make_float4(r[j], r[j + 1], r[j + 2], r[j + 3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      int row, col;
      slot_position<T, VEC>(tid, j, row, col);
      xs[row * kLdx + col] = r[j];
    }
  }
}

// out = staged + h·x for the thread's slots, written to y (rows < rows, columns < cols only).
template <typename T, bool VEC>
__device__ __forceinline__ void store_y(T* __restrict__ dst, int64_t s0, int64_t s1, int64_t row0, int rows,
                                        int64_t col0, int cols, const float* __restrict__ staged,
                                        const float (&xr)[kSlots], float h, bool has_h) {
  const int tid = threadIdx.x;
  float out[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    int row, col;
    slot_position<T, VEC>(tid, j, row, col);
    out[j] = staged[row * kLdx + col];
    if (has_h) out[j] = fmaf(h, xr[j], out[j]);
  }
  if constexpr (VEC) {
    constexpr int kV = kVecElems<T>;
#pragma unroll
    for (int i = 0; i < kSlots / kV; ++i) {
      int row, col;
      slot_position<T, VEC>(tid, i * kV, row, col);
      T* p = dst + (row0 + row) * s0 + col0 + col;
      if (row < rows && col + kV <= cols) {
        *reinterpret_cast<uint4*>(p) = pack16<T>(out + i * kV);
      } else {
#pragma unroll
        for (int e = 0; e < kV; ++e) {
          if (row < rows && col + e < cols) p[e] = from_float<T>(out[i * kV + e]);
        }
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      int row, col;
      slot_position<T, VEC>(tid, j, row, col);
      if (row < rows && col < cols) dst[(row0 + row) * s0 + (col0 + col) * s1] = from_float<T>(out[j]);
    }
  }
}

// ------------------------------------------------------------------------------------- U chunks
// Rows [row0, row0 + rows) of U (columns < k), zero-padded to kRows × K; coalesced along the k dimension.
template <int K>
__device__ __forceinline__ void load_u(float (&r)[Config<K>::kUSlots], const float* __restrict__ u, int64_t s0,
                                       int64_t s1, int64_t row0, int rows, int k) {
#pragma unroll
  for (int j = 0; j < Config<K>::kUSlots; ++j) {
    const int e = threadIdx.x + kThreads * j;
    const int row = e / K, m = e % K;
    r[j] = (row < rows && m < k) ? __ldg(u + (row0 + row) * s0 + m * s1) : 0.0f;
  }
}

template <int K>
__device__ __forceinline__ void store_u_shared(float* __restrict__ us, const float (&r)[Config<K>::kUSlots]) {
#pragma unroll
  for (int j = 0; j < Config<K>::kUSlots; ++j) {
    const int e = threadIdx.x + kThreads * j;
    us[(e / K) * Config<K>::kLdu + e % K] = r[j];
  }
}

// ------------------------------------------------------------------------------------- pass 1
// coef (shared, kGroups slices of K × kLdx) ← U_bᵀ src_b for this column tile; slice 0 holds the sum on exit.
template <typename T, int K, bool VEC>
__device__ void coefficients(const FilterArgs& a, const T* __restrict__ src, int64_t s0, int64_t s1,
                             int64_t start, int64_t stop, int64_t col0, int cols, float* us, float* xs,
                             float* coef) {
  using C = Config<K>;
  constexpr bool kSplit = std::is_same_v<T, float>;
  const int warp = threadIdx.x / 32;
  const int group = warp / (kWarps / C::kGroups);  // kGroups > 1 only when every warp has one fragment
  const int first_frag = C::kGroups > 1 ? warp % C::kFrags : warp;
  const int fn = first_frag % (kTileD / 16);       // the same column fragment for all of a warp's fragments

  FragC acc[C::kPerWarp];
#pragma unroll
  for (int i = 0; i < C::kPerWarp; ++i) wmma::fill_fragment(acc[i], 0.0f);

  float ur[C::kUSlots];
  float xr[kSlots];
  load_u<K>(ur, a.u, a.u_s0, a.u_s1, start, static_cast<int>(min64(kRows, stop - start)), a.k);
  load_x<T, VEC>(xr, src, s0, s1, start, static_cast<int>(min64(kRows, stop - start)), col0, cols);
  for (int64_t row0 = start; row0 < stop; row0 += kRows) {
    __syncthreads();  // the previous chunk's products are done with us / xs
    store_u_shared<K>(us, ur);
    store_x_shared<T, VEC>(xs, xr);
    __syncthreads();
    const int64_t next = row0 + kRows;
    if (next < stop) {  // in flight while the tensor cores work on this chunk
      const int rows = static_cast<int>(min64(kRows, stop - next));
      load_u<K>(ur, a.u, a.u_s0, a.u_s1, next, rows, a.k);
      load_x<T, VEC>(xr, src, s0, s1, next, rows, col0, cols);
    }
#pragma unroll 1
    for (int s = group; s < kRows / 8; s += C::kGroups) {
#pragma unroll
      for (int i = 0; i < C::kPerWarp; ++i) {
        const int fm = (first_frag + kWarps * i) / (kTileD / 16);
        if (fm * 16 < a.k) {  // fragments of the zero columns past k stay zero
          mma_tf32<kSplit, FragA1>(acc[i], us + s * 8 * C::kLdu + fm * 16, C::kLdu, xs + s * 8 * kLdx + fn * 16,
                                   kLdx);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < C::kPerWarp; ++i) {
    const int fm = (first_frag + kWarps * i) / (kTileD / 16);
    wmma::store_matrix_sync(coef + group * K * kLdx + fm * 16 * kLdx + fn * 16, acc[i], kLdx, wmma::mem_row_major);
  }
  __syncthreads();
  if constexpr (C::kGroups > 1) {
    for (int e = threadIdx.x; e < K * kTileD; e += kThreads) {
      const int idx = (e / kTileD) * kLdx + e % kTileD;
      float sum = coef[idx];
#pragma unroll
      for (int g = 1; g < C::kGroups; ++g) sum += coef[g * K * kLdx + idx];
      coef[idx] = sum;
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------- the kernel
template <typename T, int K, bool VEC>
__global__ void __launch_bounds__(kThreads, Config<K>::kMinBlocksPerSM) spectral_filter_kernel(const FilterArgs a) {
  using C = Config<K>;
  constexpr bool kSplit = std::is_same_v<T, float>;
  extern __shared__ __align__(128) float smem[];
  float* us = smem;               // kRows × kLdu: a chunk of U_b
  float* xs = us + C::kUFloats;   // kRows × kLdx: a chunk of x (pass 1), the staged products (pass 2)
  float* coef = xs + C::kXFloats; // kGroups × K × kLdx: C = U_bᵀ x_b
  float* saved_coef = coef + C::kCFloats;  // the same for the saved input (gains gradient only)

  const int64_t block = blockIdx.x;
  const int64_t tile = blockIdx.y;
  // Clamped so that corrupt offsets cannot index outside the n rows.
  const int64_t stop = min64(max64(a.block_ptr[block + 1], 0), a.n);
  const int64_t start = min64(max64(a.block_ptr[block], 0), stop);
  const int64_t col0 = tile * kTileD;
  const int cols = static_cast<int>(min64(kTileD, a.d - col0));
  const T* x = static_cast<const T*>(a.x);

  if (start == stop) {  // empty block: nothing to write but zero partials
    if (a.gain_grad != nullptr) {
      for (int m = threadIdx.x; m < a.k; m += kThreads) a.gain_grad[(block * gridDim.y + tile) * a.k + m] = 0.0f;
    }
    return;
  }

  coefficients<T, K, VEC>(a, x, a.x_s0, a.x_s1, start, stop, col0, cols, us, xs, coef);

  if (a.gain_grad != nullptr) {
    coefficients<T, K, VEC>(a, static_cast<const T*>(a.saved), a.saved_s0, a.saved_s1, start, stop, col0, cols,
                            us, xs, saved_coef);
    // partial[m] = Σ_columns C[m, :] · S[m, :], one warp per frequency.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int m = warp; m < a.k; m += kWarps) {
      float sum = 0.0f;
      for (int c = lane; c < kTileD; c += 32) sum += coef[m * kLdx + c] * saved_coef[m * kLdx + c];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      if (lane == 0) a.gain_grad[(block * gridDim.y + tile) * a.k + m] = sum;
    }
    __syncthreads();  // the partials read C unscaled
  }
  if (!a.write_y) return;

  // C ← diag(g_b − h) C; rows past k are zero already.
  const float h = a.passthrough;
  for (int e = threadIdx.x; e < a.k * kTileD; e += kThreads) {
    const int m = e / kTileD;
    coef[m * kLdx + e % kTileD] *= a.gains[block * a.g_s0 + m * a.g_s1] - h;
  }

  // Pass 2: y = h·x + U_b C. Warp w owns output fragment (fr, fn) of each kRows × kTileD chunk.
  const int warp = threadIdx.x / 32;
  const int fr = warp / (kTileD / 16), fn = warp % (kTileD / 16);
  const int ksteps = (a.k + 7) / 8;
  const bool has_h = h != 0.0f;
  T* y = static_cast<T*>(a.y);
  float ur[C::kUSlots];
  float xr[kSlots], xr_next[kSlots];
  int rows = static_cast<int>(min64(kRows, stop - start));
  load_u<K>(ur, a.u, a.u_s0, a.u_s1, start, rows, a.k);
  if (has_h) load_x<T, VEC>(xr_next, x, a.x_s0, a.x_s1, start, rows, col0, cols);
  for (int64_t row0 = start; row0 < stop; row0 += kRows) {
    rows = static_cast<int>(min64(kRows, stop - row0));
    __syncthreads();  // the scaled C is complete / the previous chunk's staging is consumed
    store_u_shared<K>(us, ur);
    if (has_h) {
#pragma unroll
      for (int j = 0; j < kSlots; ++j) xr[j] = xr_next[j];
    }
    __syncthreads();
    const int64_t next = row0 + kRows;
    if (next < stop) {
      const int next_rows = static_cast<int>(min64(kRows, stop - next));
      load_u<K>(ur, a.u, a.u_s0, a.u_s1, next, next_rows, a.k);
      if (has_h) load_x<T, VEC>(xr_next, x, a.x_s0, a.x_s1, next, next_rows, col0, cols);
    }
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll 2
    for (int j = 0; j < ksteps; ++j) {
      mma_tf32<kSplit, FragA2>(acc, us + fr * 16 * C::kLdu + j * 8, C::kLdu, coef + j * 8 * kLdx + fn * 16, kLdx);
    }
    wmma::store_matrix_sync(xs + fr * 16 * kLdx + fn * 16, acc, kLdx, wmma::mem_row_major);
    __syncthreads();
    store_y<T, VEC>(y, a.y_s0, a.y_s1, row0, rows, col0, cols, xs, xr, h, has_h);
  }
}

// ------------------------------------------------------------------------------------- launch
template <typename T, int K, bool VEC>
cudaError_t launch_variant(const FilterArgs& a, cudaStream_t stream) {
  const size_t smem = Config<K>::smem_bytes(a.gain_grad != nullptr);
  auto kernel = spectral_filter_kernel<T, K, VEC>;
  if (smem > 48 * 1024) {  // above the default per-block limit: opt in (sm_80+ allow ≥ 99 KiB)
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(a.num_blocks), static_cast<unsigned>(num_col_tiles(a.d)));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int K>
cudaError_t launch_k(const FilterArgs& a, bool vec, cudaStream_t stream) {
  return vec ? launch_variant<T, K, true>(a, stream) : launch_variant<T, K, false>(a, stream);
}

template <typename T>
std::string launch(const FilterArgs& a, DType dtype, int device, void* stream_handle) {
  if (a.num_blocks == 0 || a.d == 0) return "";  // nothing to compute; the caller shapes empty outputs
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    const bool vec = can_vectorize(a, dtype);
    const auto stream = static_cast<cudaStream_t>(stream_handle);
    if (a.k <= 16) {
      err = launch_k<T, 16>(a, vec, stream);
    } else if (a.k <= 32) {
      err = launch_k<T, 32>(a, vec, stream);
    } else if (a.k <= 64) {
      err = launch_k<T, 64>(a, vec, stream);
    } else {
      err = launch_k<T, 128>(a, vec, stream);
    }
  }
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  if (err == cudaSuccess) return "";
  return std::string("spectral_filter CUDA launch failed on device ") + std::to_string(device) + ": " +
         cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

}  // namespace detail
}  // namespace spectralkern
