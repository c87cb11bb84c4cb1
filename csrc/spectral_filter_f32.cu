// float instantiations of the spectral filter kernels (one file per dtype so the build compiles them in parallel).
#include "spectral_filter_kernel.cuh"

namespace spectralkern {

std::string launch_spectral_filter_f32(const FilterArgs& a, int device, void* stream) {
  return detail::launch<float>(a, DType::kFloat32, device, stream);
}

}  // namespace spectralkern
