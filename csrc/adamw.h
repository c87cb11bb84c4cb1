// Host-side interface of the AdamW kernels: the spectral one (filtered gradient fused into the update, per block of
// the parameter graph) and the plain elementwise one (parameters without a graph).
//
// The update is torch.optim.AdamW's non-amsgrad step on a gradient g̃ (the filtered one, or g itself):
//     p ← p·(1 − lr·wd);  m ← m + (1 − β1)(g̃ − m);  v ← β2·v + (1 − β2)·g̃·g̃
//     p ← p + (−lr / (1 − β1^t))·m / (√v / √(1 − β2^t) + ε)
// with the scalars precomputed on the host as AdamWScalars (what spectralkern/ops/adamw_update.py `_scalars` makes).
// Plain C++ (no CUDA headers), so the pybind11 bindings compile with the host compiler alone.
#pragma once

#include <cstdint>
#include <string>

#include "spectral_filter.h"

namespace spectralkern {

// The per-step scalars, in the order of spectralkern/ops/adamw_update.py `_scalars` (rounded to fp32 there too).
struct AdamWScalars {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float decay;                  // 1 − lr·weight_decay
  float step_size;              // lr / (1 − β1^t)
  float bias_correction2_sqrt;  // √(1 − β2^t)
};

struct SpectralAdamWArgs {
  // The gradient as the filter's input (x = grad, of the parameter's dtype), with U, gains, block_ptr, n, d, k,
  // num_blocks and passthrough; y / saved / gain_grad are unused.
  FilterArgs filter;
  void* p;  // (n, d) of the parameter dtype
  int64_t p_s0, p_s1;
  void* m;  // (n, d) of the state dtype
  int64_t m_s0, m_s1;
  void* v;  // (n, d) of the state dtype
  int64_t v_s0, v_s1;
  AdamWScalars hyper;
};

struct PlainAdamWArgs {  // flat, dense tensors of `numel` elements
  const void* g;         // parameter dtype
  void* p;               // parameter dtype
  void* m;               // state dtype
  void* v;               // state dtype
  int64_t numel;
  AdamWScalars hyper;
};

// The (parameter / gradient dtype, state dtype) pairs the kernels are compiled for: what the optimizer allocates
// (fp32 moments, or bf16 moments for bf16 parameters on request). float16 parameters with bfloat16 moments are
// left to the Triton kernels.
inline bool adamw_dtypes_supported(DType param, DType state) {
  return state == DType::kFloat32 ? true : (state == DType::kBFloat16 && param == DType::kBFloat16);
}

// True when 16-byte vector accesses are legal for g, p, m and v (same rule as the filter's can_vectorize).
inline bool can_vectorize(const SpectralAdamWArgs& a, DType param, DType state) {
  const int64_t ep = element_size(param), es = element_size(state);
  auto ok = [](const void* ptr, int64_t s0, int64_t s1, int64_t size) {
    return s1 == 1 && reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && (s0 * size) % 16 == 0;
  };
  return ok(a.filter.x, a.filter.x_s0, a.filter.x_s1, ep) && ok(a.p, a.p_s0, a.p_s1, ep) &&
         ok(a.m, a.m_s0, a.m_s1, es) && ok(a.v, a.v_s0, a.v_s1, es);
}

inline bool can_vectorize(const PlainAdamWArgs& a) {
  auto ok = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  return ok(a.g) && ok(a.p) && ok(a.m) && ok(a.v);
}

// Launch on `stream` (a cudaStream_t) of device `device`. Returns "" on success, else the CUDA error text.
// Arguments must already be validated (the bindings do that), the dtype pair among adamw_dtypes_supported.
// One entry point per parameter dtype (one translation unit each, compiled in parallel).
std::string launch_spectral_adamw_f32(const SpectralAdamWArgs& a, DType state, int device, void* stream);
std::string launch_spectral_adamw_f16(const SpectralAdamWArgs& a, DType state, int device, void* stream);
std::string launch_spectral_adamw_bf16(const SpectralAdamWArgs& a, DType state, int device, void* stream);
std::string launch_adamw(const PlainAdamWArgs& a, DType param, DType state, int device, void* stream);

}  // namespace spectralkern
