// float16 parameters with fp32 moments: the spectral AdamW kernels (one file per parameter dtype: the build compiles
// them in parallel).
#include "adamw_kernel.cuh"

namespace spectralkern {

std::string launch_spectral_adamw_f16(const SpectralAdamWArgs& a, DType state, int device, void* stream) {
  (void)state;  // fp16 parameters are compiled with fp32 moments only (adamw_dtypes_supported)
  return detail::launch_spectral<__half, float>(a, DType::kFloat16, DType::kFloat32, device, stream);
}

}  // namespace spectralkern
