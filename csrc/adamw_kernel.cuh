// AdamW kernels: the spectral one (gradient filter fused into the update) and the plain elementwise one.
//
// Spectral: one CUDA block of 256 threads per (graph block b, column tile of kTileD columns), all ragged blocks of one
// parameter in one launch, the spectral filter's structure (spectral_filter_kernel.cuh):
//   pass 1  C = U_bᵀ g_b (K × kTileD) on tensor cores, staged through shared memory; C never leaves the chip.
//   scale   C ← diag(gains_b − h) C.
//   pass 2  per chunk of kRows rows: this chunk's p, m, v (and g when h ≠ 0) are loaded while the tensor cores form
//           U_b C; then g̃ = U_b C + h·g and the AdamW update, and p, m, v are stored. Each of g, p, m, v is read once
//           from global memory (g twice when h ≠ 0, the second time straight after pass 1, from L2), m, v, p written
//           once; no full-size temporary. g̃ is bit-identical to the CUDA filter's fp32 output for the same g.
// fp32 gradients use 3xTF32 products (≈ fp32 accuracy), fp16/bf16 ones a single TF32 product (exact on the g side).
//
// Plain: a grid-stride elementwise kernel over flat, dense tensors, 8 elements per thread per step.
//
// Both apply the update in fp32 whatever the storage (fp32/fp16/bf16 parameters, fp32 or bf16 moments), each
// operation rounded once in the order of torch's single-tensor AdamW and of the Triton kernels
// (spectralkern/ops/_triton_spectral_adamw.py, _triton_adamw.py): the __f*_rn intrinsics keep nvcc from contracting
// them into FMAs, sqrt and the two divisions are IEEE-rounded. 16-byte vector accesses when all four tensors allow.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "adamw.h"
#include "spectral_filter_kernel.cuh"

namespace spectralkern {
namespace detail {

constexpr int kElems = kRows * kTileD / kThreads;  // elements of a chunk each thread updates
static_assert(kElems == 8 && kTileD % kElems == 0, "a thread's elements are one 16-byte vector of a 2-byte type");

// ------------------------------------------------------------------------------------- the update
__device__ __forceinline__ void adamw_step(float g, float& p, float& m, float& v, const AdamWScalars& h) {
  p = __fmul_rn(p, h.decay);
  m = __fadd_rn(m, __fmul_rn(h.one_minus_beta1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, h.beta2), __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), h.bias_correction2_sqrt), h.eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(-h.step_size, m), denom));
}

// ------------------------------------------------------------------------------------- 8 elements <-> registers
// On the vector path a thread's kElems elements sit contiguously in memory: one 16-byte vector of a 2-byte type, two
// of fp32. So tensors of different dtypes (bf16 p with fp32 m, v) move as whole vectors under one element map.
template <typename E>
__device__ __forceinline__ void load8(float (&r)[kElems], const E* __restrict__ p) {
  constexpr int kV = kVecElems<E>;
#pragma unroll
  for (int i = 0; i < kElems / kV; ++i) unpack16<E>(reinterpret_cast<const uint4*>(p)[i], r + i * kV);
}

template <typename E>
__device__ __forceinline__ void store8(E* __restrict__ p, const float (&r)[kElems]) {
  constexpr int kV = kVecElems<E>;
#pragma unroll
  for (int i = 0; i < kElems / kV; ++i) reinterpret_cast<uint4*>(p)[i] = pack16<E>(r + i * kV);
}

// Tile map of pass 2. VEC: thread t owns 8 consecutive columns of row t / 8; scalar: elements t, t + kThreads, ...
// of the kRows × kTileD chunk in row-major order (coalesced for a unit column stride).
template <bool VEC>
__device__ __forceinline__ void elem_position(int tid, int j, int& row, int& col) {
  if constexpr (VEC) {
    row = tid / (kTileD / kElems);
    col = (tid % (kTileD / kElems)) * kElems + j;
  } else {
    const int e = tid + kThreads * j;
    row = e / kTileD;
    col = e % kTileD;
  }
}

// Rows [row0, row0 + rows) × columns [col0, col0 + cols) of src, in the thread's elements; zeros elsewhere.
template <typename E, bool VEC>
__device__ __forceinline__ void load_tile(float (&r)[kElems], const E* __restrict__ src, int64_t s0, int64_t s1,
                                          int64_t row0, int rows, int64_t col0, int cols) {
  asm volatile("" : "+l"(s0), "+l"(s1));
  int row, col;
  if constexpr (VEC) {
    elem_position<VEC>(threadIdx.x, 0, row, col);
    const E* p = src + (row0 + row) * s0 + col0 + col;
    if (row < rows && col + kElems <= cols) {
      load8<E>(r, p);
    } else {
#pragma unroll
      for (int j = 0; j < kElems; ++j) r[j] = (row < rows && col + j < cols) ? to_float(p[j]) : 0.0f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      elem_position<VEC>(threadIdx.x, j, row, col);
      r[j] = (row < rows && col < cols) ? to_float(src[(row0 + row) * s0 + (col0 + col) * s1]) : 0.0f;
    }
  }
}

template <typename E, bool VEC>
__device__ __forceinline__ void store_tile(E* __restrict__ dst, int64_t s0, int64_t s1, int64_t row0, int rows,
                                           int64_t col0, int cols, const float (&r)[kElems]) {
  asm volatile("" : "+l"(s0), "+l"(s1));
  int row, col;
  if constexpr (VEC) {
    elem_position<VEC>(threadIdx.x, 0, row, col);
    E* p = dst + (row0 + row) * s0 + col0 + col;
    if (row < rows && col + kElems <= cols) {
      store8<E>(p, r);
    } else {
#pragma unroll
      for (int j = 0; j < kElems; ++j) {
        if (row < rows && col + j < cols) p[j] = from_float<E>(r[j]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      elem_position<VEC>(threadIdx.x, j, row, col);
      if (row < rows && col < cols) dst[(row0 + row) * s0 + (col0 + col) * s1] = from_float<E>(r[j]);
    }
  }
}

// ------------------------------------------------------------------------------------- spectral kernel
template <typename T, typename S, int K, bool VEC>
__global__ void __launch_bounds__(kThreads, Config<K>::kMinBlocksPerSM)
    spectral_adamw_kernel(const SpectralAdamWArgs a) {
  using C = Config<K>;
  constexpr bool kSplit = std::is_same_v<T, float>;
  extern __shared__ __align__(128) float smem[];
  float* us = smem;                // kRows × kLdu: a chunk of U_b
  float* xs = us + C::kUFloats;    // kRows × kLdx: a chunk of g (pass 1), U_b C (pass 2)
  float* coef = xs + C::kXFloats;  // kGroups × K × kLdx: C = U_bᵀ g_b

  const FilterArgs& f = a.filter;
  const int64_t block = blockIdx.x;
  // Clamped so that corrupt offsets cannot index outside the n rows.
  const int64_t stop = min64(max64(f.block_ptr[block + 1], 0), f.n);
  const int64_t start = min64(max64(f.block_ptr[block], 0), stop);
  if (start == stop) return;  // an empty block owns no rows
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTileD;
  const int cols = static_cast<int>(min64(kTileD, f.d - col0));
  const T* g = static_cast<const T*>(f.x);

  coefficients<T, K, VEC>(f, g, f.x_s0, f.x_s1, start, stop, col0, cols, us, xs, coef);

  const float h = f.passthrough;
  for (int e = threadIdx.x; e < f.k * kTileD; e += kThreads) {  // rows past k are zero already
    const int m = e / kTileD;
    coef[m * kLdx + e % kTileD] *= f.gains[block * f.g_s0 + m * f.g_s1] - h;
  }

  // Pass 2. Warp w owns output fragment (fr, fn) of each kRows × kTileD chunk of U_b C.
  const int warp = threadIdx.x / 32;
  const int fr = warp / (kTileD / 16), fn = warp % (kTileD / 16);
  const int ksteps = (f.k + 7) / 8;
  const bool has_h = h != 0.0f;
  T* p = static_cast<T*>(a.p);
  S* m = static_cast<S*>(a.m);
  S* v = static_cast<S*>(a.v);
  float ur[C::kUSlots];
  load_u<K>(ur, f.u, f.u_s0, f.u_s1, start, static_cast<int>(min64(kRows, stop - start)), f.k);
  for (int64_t row0 = start; row0 < stop; row0 += kRows) {
    const int rows = static_cast<int>(min64(kRows, stop - row0));
    __syncthreads();  // the scaled C is complete / the previous chunk's U and products are consumed
    store_u_shared<K>(us, ur);
    __syncthreads();
    float pr[kElems], mr[kElems], vr[kElems];
    auto load_state = [&] {
      load_tile<T, VEC>(pr, p, a.p_s0, a.p_s1, row0, rows, col0, cols);
      load_tile<S, VEC>(mr, m, a.m_s0, a.m_s1, row0, rows, col0, cols);
      load_tile<S, VEC>(vr, v, a.v_s0, a.v_s1, row0, rows, col0, cols);
    };
    // Vector path: this chunk's p, m, v are in flight while the tensor cores work. The scalar path loads them after
    // the products: its 24 separate addresses held across the products spilled ~500 bytes per thread (ptxas -v).
    if constexpr (VEC) load_state();
    const int64_t next = row0 + kRows;
    if (next < stop) load_u<K>(ur, f.u, f.u_s0, f.u_s1, next, static_cast<int>(min64(kRows, stop - next)), f.k);

    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll 2
    for (int j = 0; j < ksteps; ++j) {
      mma_tf32<kSplit, FragA2>(acc, us + fr * 16 * C::kLdu + j * 8, C::kLdu, coef + j * 8 * kLdx + fn * 16, kLdx);
    }
    wmma::store_matrix_sync(xs + fr * 16 * kLdx + fn * 16, acc, kLdx, wmma::mem_row_major);
    if constexpr (!VEC) load_state();
    float gr[kElems];  // h·g: g comes back from L2 (pass 1 read this tile of it)
    if (has_h) load_tile<T, VEC>(gr, g, f.x_s0, f.x_s1, row0, rows, col0, cols);
    __syncthreads();

#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      int row, col;
      elem_position<VEC>(threadIdx.x, j, row, col);
      float filtered = xs[row * kLdx + col];
      if (has_h) filtered = fmaf(h, gr[j], filtered);  // as the filter's epilogue forms h·x + U_b C
      adamw_step(filtered, pr[j], mr[j], vr[j], a.hyper);
    }
    store_tile<S, VEC>(m, a.m_s0, a.m_s1, row0, rows, col0, cols, mr);
    store_tile<S, VEC>(v, a.v_s0, a.v_s1, row0, rows, col0, cols, vr);
    store_tile<T, VEC>(p, a.p_s0, a.p_s1, row0, rows, col0, cols, pr);
  }
}

// ------------------------------------------------------------------------------------- plain kernel
// Flat elements [base, base + kThreads · kElems) per CUDA block and step; VEC: thread t owns 8 consecutive ones
// starting at base + 8t (a partial vector at the end goes scalar); scalar: base + t + kThreads · j.
template <typename E, bool VEC>
__device__ __forceinline__ void load_flat(float (&r)[kElems], const E* __restrict__ src, int64_t base,
                                          int64_t numel) {
  if constexpr (VEC) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kElems;
    if (first + kElems <= numel) {
      load8<E>(r, src + first);
    } else {
#pragma unroll
      for (int j = 0; j < kElems; ++j) r[j] = first + j < numel ? to_float(src[first + j]) : 0.0f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      const int64_t i = base + threadIdx.x + static_cast<int64_t>(kThreads) * j;
      r[j] = i < numel ? to_float(src[i]) : 0.0f;
    }
  }
}

template <typename E, bool VEC>
__device__ __forceinline__ void store_flat(E* __restrict__ dst, int64_t base, int64_t numel,
                                           const float (&r)[kElems]) {
  if constexpr (VEC) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kElems;
    if (first + kElems <= numel) {
      store8<E>(dst + first, r);
    } else {
#pragma unroll
      for (int j = 0; j < kElems; ++j) {
        if (first + j < numel) dst[first + j] = from_float<E>(r[j]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      const int64_t i = base + threadIdx.x + static_cast<int64_t>(kThreads) * j;
      if (i < numel) dst[i] = from_float<E>(r[j]);
    }
  }
}

constexpr int64_t kPlainChunk = static_cast<int64_t>(kThreads) * kElems;  // elements per CUDA block and step
constexpr int64_t kPlainMaxBlocks = 1 << 20;  // grid cap; the grid-stride loop covers larger tensors

template <typename T, typename S, bool VEC>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const PlainAdamWArgs a) {
  const T* g = static_cast<const T*>(a.g);
  T* p = static_cast<T*>(a.p);
  S* m = static_cast<S*>(a.m);
  S* v = static_cast<S*>(a.v);
  for (int64_t base = blockIdx.x * kPlainChunk; base < a.numel; base += gridDim.x * kPlainChunk) {
    float gr[kElems], pr[kElems], mr[kElems], vr[kElems];
    load_flat<T, VEC>(gr, g, base, a.numel);
    load_flat<T, VEC>(pr, p, base, a.numel);
    load_flat<S, VEC>(mr, m, base, a.numel);
    load_flat<S, VEC>(vr, v, base, a.numel);
#pragma unroll
    for (int j = 0; j < kElems; ++j) adamw_step(gr[j], pr[j], mr[j], vr[j], a.hyper);
    store_flat<S, VEC>(m, base, a.numel, mr);
    store_flat<S, VEC>(v, base, a.numel, vr);
    store_flat<T, VEC>(p, base, a.numel, pr);
  }
}

// ------------------------------------------------------------------------------------- launch
// Runs `launch` (returning a cudaError_t) with `device` current, restoring the caller's device afterwards.
template <class Launch>
std::string on_device(const char* what, int device, Launch&& launch) {
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err == cudaSuccess) err = launch();
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  if (err == cudaSuccess) return "";
  return std::string(what) + " CUDA launch failed on device " + std::to_string(device) + ": " + cudaGetErrorName(err) +
         " (" + cudaGetErrorString(err) + ")";
}

template <typename T, typename S, int K, bool VEC>
cudaError_t launch_spectral_variant(const SpectralAdamWArgs& a, cudaStream_t stream) {
  const size_t smem = Config<K>::smem_bytes(false);
  auto kernel = spectral_adamw_kernel<T, S, K, VEC>;
  if (smem > 48 * 1024) {  // above the default per-block limit: opt in (sm_80+ allow ≥ 99 KiB)
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(a.filter.num_blocks), static_cast<unsigned>(num_col_tiles(a.filter.d)));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename S, bool VEC>
cudaError_t launch_spectral_k(const SpectralAdamWArgs& a, cudaStream_t stream) {
  const int k = a.filter.k;
  if (k <= 16) return launch_spectral_variant<T, S, 16, VEC>(a, stream);
  if (k <= 32) return launch_spectral_variant<T, S, 32, VEC>(a, stream);
  if (k <= 64) return launch_spectral_variant<T, S, 64, VEC>(a, stream);
  return launch_spectral_variant<T, S, 128, VEC>(a, stream);
}

template <typename T, typename S>
std::string launch_spectral(const SpectralAdamWArgs& a, DType param, DType state, int device, void* stream_handle) {
  if (a.filter.num_blocks == 0 || a.filter.n == 0 || a.filter.d == 0) return "";  // nothing to update
  const bool vec = can_vectorize(a, param, state);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  return on_device("spectral_adamw", device, [&] {
    return vec ? launch_spectral_k<T, S, true>(a, stream) : launch_spectral_k<T, S, false>(a, stream);
  });
}

template <typename T, typename S>
std::string launch_plain(const PlainAdamWArgs& a, int device, void* stream_handle) {
  if (a.numel == 0) return "";
  const bool vec = can_vectorize(a);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t blocks = (a.numel + kPlainChunk - 1) / kPlainChunk;
  const dim3 grid(static_cast<unsigned>(blocks < kPlainMaxBlocks ? blocks : kPlainMaxBlocks));
  return on_device("adamw", device, [&] {
    if (vec) {
      adamw_kernel<T, S, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      adamw_kernel<T, S, false><<<grid, kThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

// The plain update for any compiled dtype pair (what `launch_adamw` does; shared by the build and the compile check).
inline std::string launch_plain_any(const PlainAdamWArgs& a, DType param, DType state, int device, void* stream) {
  switch (param) {
    case DType::kFloat32: return launch_plain<float, float>(a, device, stream);
    case DType::kFloat16: return launch_plain<__half, float>(a, device, stream);
    case DType::kBFloat16:
      return state == DType::kBFloat16 ? launch_plain<__nv_bfloat16, __nv_bfloat16>(a, device, stream)
                                       : launch_plain<__nv_bfloat16, float>(a, device, stream);
  }
  return "adamw: unsupported dtype code " + std::to_string(static_cast<int>(param));
}

}  // namespace detail
}  // namespace spectralkern
