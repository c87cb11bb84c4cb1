// bfloat16 parameters with fp32 or bf16 moments: the spectral AdamW kernels (one file per parameter dtype: the build
// compiles them in parallel).
#include "adamw_kernel.cuh"

namespace spectralkern {

std::string launch_spectral_adamw_bf16(const SpectralAdamWArgs& a, DType state, int device, void* stream) {
  if (state == DType::kBFloat16) {
    return detail::launch_spectral<__nv_bfloat16, __nv_bfloat16>(a, DType::kBFloat16, state, device, stream);
  }
  return detail::launch_spectral<__nv_bfloat16, float>(a, DType::kBFloat16, state, device, stream);
}

}  // namespace spectralkern
