// float32 parameters (fp32 moments): the spectral AdamW kernels, plus the plain AdamW kernels of every dtype pair
// (small elementwise kernels). One file per parameter dtype, so the build compiles the spectral ones in parallel.
#include "adamw_kernel.cuh"

namespace spectralkern {

std::string launch_spectral_adamw_f32(const SpectralAdamWArgs& a, DType state, int device, void* stream) {
  (void)state;  // fp32 parameters keep fp32 moments (adamw_dtypes_supported)
  return detail::launch_spectral<float, float>(a, DType::kFloat32, DType::kFloat32, device, stream);
}

std::string launch_adamw(const PlainAdamWArgs& a, DType param, DType state, int device, void* stream) {
  return detail::launch_plain_any(a, param, state, device, stream);
}

}  // namespace spectralkern
