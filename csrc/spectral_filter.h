// Host-side interface of the fused spectral filter kernels: y_b = h·x_b + U_b diag(g_b − h) U_bᵀ x_b per block.
//
// Plain C++ (no CUDA headers), so the pybind11 bindings compile with the host compiler alone. Tensors arrive as
// raw device pointers with element strides; nothing here links against libtorch.
#pragma once

#include <cstdint>
#include <string>

namespace spectralkern {

// Dtype codes of x / y / saved_x, shared with the Python side (spectralkern/ops/spectral_filter.py).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kTileD = 64;   // columns of x handled by one CUDA block; gain_grad partials are per tile
constexpr int kMaxK = 128;   // largest basis width the kernels instantiate

struct FilterArgs {
  const void* x;             // (n, d) of `dtype`: the input (or grad_y in the backward)
  int64_t x_s0, x_s1;
  const void* saved;         // (n, d) of `dtype`: the forward input, read only when gain_grad != nullptr
  int64_t saved_s0, saved_s1;
  const float* u;            // (n, k) float32, block-packed basis
  int64_t u_s0, u_s1;
  const float* gains;        // (num_blocks, k) float32
  int64_t g_s0, g_s1;
  const int64_t* block_ptr;  // (num_blocks + 1,) int64 row offsets, on the device
  void* y;                   // (n, d) of `dtype`, written only when write_y
  int64_t y_s0, y_s1;
  float* gain_grad;          // (num_blocks, ceil(d / kTileD), k) float32 partial sums, or nullptr
  int64_t n, d;
  int k;
  int64_t num_blocks;
  float passthrough;
  bool write_y;
};

inline int64_t num_col_tiles(int64_t d) { return (d + kTileD - 1) / kTileD; }

inline int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// True when 16-byte vector loads/stores are legal for every (n, d) operand the call touches: contiguous rows
// (column stride 1), a 16-byte-aligned base pointer and a row stride that is a multiple of 16 bytes.
inline bool can_vectorize(const FilterArgs& a, DType dtype) {
  const int64_t es = element_size(dtype);
  auto ok = [es](const void* p, int64_t s0, int64_t s1) {
    return s1 == 1 && reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (s0 * es) % 16 == 0;
  };
  return ok(a.x, a.x_s0, a.x_s1) && (!a.write_y || ok(a.y, a.y_s0, a.y_s1)) &&
         (a.gain_grad == nullptr || ok(a.saved, a.saved_s0, a.saved_s1));
}

// Launch on `stream` (a cudaStream_t) of device `device`. Returns "" on success, else the CUDA error text.
// Arguments must already be validated (the bindings do that).
std::string launch_spectral_filter_f32(const FilterArgs& a, int device, void* stream);
std::string launch_spectral_filter_f16(const FilterArgs& a, int device, void* stream);
std::string launch_spectral_filter_bf16(const FilterArgs& a, int device, void* stream);

// What this binary was compiled with (no CUDA calls): CUDART_VERSION and the __CUDA_ARCH_LIST__ entries.
int compiled_cuda_version();
std::string compiled_arch_list();  // e.g. "800,900"
// cudaDriverGetVersion: the CUDA version the installed driver supports (1000·major + 10·minor), 0 without one.
int driver_cuda_version();

}  // namespace spectralkern
