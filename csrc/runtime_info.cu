// What this binary was built with, and the driver it finds. Compiled by nvcc so that __CUDA_ARCH_LIST__ (the
// virtual architectures of this compilation, e.g. 800,900) and CUDART_VERSION describe the shipped kernels.
#include <cuda_runtime_api.h>

#include <string>

#include "spectral_filter.h"

#ifndef __CUDA_ARCH_LIST__
#error "nvcc >= 11.5 is required (it defines __CUDA_ARCH_LIST__)"
#endif

namespace spectralkern {

int compiled_cuda_version() { return CUDART_VERSION; }

std::string compiled_arch_list() {
  static const int archs[] = {__CUDA_ARCH_LIST__};
  std::string out;
  for (const int arch : archs) {
    if (!out.empty()) out += ",";
    out += std::to_string(arch);
  }
  return out;
}

int driver_cuda_version() {
  // Loads the driver library on first use (static cudart dlopens libcuda); returns 0 when there is none.
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace spectralkern
