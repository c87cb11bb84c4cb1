// __half instantiations of the spectral filter kernels (one file per dtype so the build compiles them in parallel).
#include "spectral_filter_kernel.cuh"

namespace spectralkern {

std::string launch_spectral_filter_f16(const FilterArgs& a, int device, void* stream) {
  return detail::launch<__half>(a, DType::kFloat16, device, stream);
}

}  // namespace spectralkern
