// __nv_bfloat16 instantiations of the spectral filter kernels (one file per dtype: the build compiles them in
// parallel).
#include "spectral_filter_kernel.cuh"

namespace spectralkern {

std::string launch_spectral_filter_bf16(const FilterArgs& a, int device, void* stream) {
  return detail::launch<__nv_bfloat16>(a, DType::kBFloat16, device, stream);
}

}  // namespace spectralkern
