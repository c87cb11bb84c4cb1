// pybind11 module spectralkern._C: the CUDA kernels behind raw pointers, sizes, strides, dtype codes and the
// caller's stream. No libtorch and no CUDA call at import, so the module imports on machines without a GPU.
//
// A tensor travels as (data_ptr, rows, cols, stride0, stride1) with strides in elements. Every check below runs
// before any CUDA call and names the argument and the value it got.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

#include "spectral_filter.h"

namespace py = pybind11;

namespace spectralkern {
namespace {

using Desc = std::tuple<std::uintptr_t, int64_t, int64_t, int64_t, int64_t>;  // ptr, rows, cols, s0, s1
using Flat = std::pair<std::uintptr_t, int64_t>;                               // ptr, numel

constexpr int64_t kMaxColTiles = 65535;  // gridDim.y

struct Tensor2d {
  const char* name;
  std::uintptr_t ptr;
  int64_t rows, cols, s0, s1;
};

Tensor2d unpack(const char* name, const Desc& d) {
  const auto& [ptr, rows, cols, s0, s1] = d;
  return {name, ptr, rows, cols, s0, s1};
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  throw py::value_error(out.str());
}

std::string shape(int64_t rows, int64_t cols) {
  return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
}

void check_layout(const Tensor2d& t) {
  if (t.rows < 0 || t.cols < 0) fail(t.name, " must have a non-negative shape, got ", shape(t.rows, t.cols));
  if (t.s0 < 0 || t.s1 < 0) fail(t.name, " must have non-negative strides, got ", shape(t.s0, t.s1));
  if (t.rows * t.cols > 0 && t.ptr == 0) {
    fail(t.name, " has ", t.rows * t.cols, " elements but a null data pointer");
  }
}

DType check_dtype(int code) {
  if (code < 0 || code > 2) fail("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", code);
  return static_cast<DType>(code);
}

FilterArgs make_args(const Desc& x_desc, const Desc& u_desc, const Desc& gains_desc, const Flat& block_ptr,
                     const std::optional<Desc>& y_desc, const std::optional<Desc>& saved_desc,
                     const std::optional<Flat>& gain_grad, double passthrough) {
  const Tensor2d x = unpack("x", x_desc), u = unpack("U", u_desc), gains = unpack("gains", gains_desc);
  for (const Tensor2d& t : {x, u, gains}) check_layout(t);
  if (x.rows != u.rows) fail("x must have ", u.rows, " rows (basis has ", u.rows, "), got ", x.rows);
  if (u.cols < 1 || u.cols > kMaxK) {
    fail("U must have between 1 and ", kMaxK, " columns (k) for the CUDA backend, got ", u.cols);
  }
  if (block_ptr.second < 2) fail("block_ptr must hold at least 2 offsets (one block), got ", block_ptr.second);
  if (block_ptr.first == 0) fail("block_ptr has ", block_ptr.second, " elements but a null data pointer");
  const int64_t num_blocks = block_ptr.second - 1;
  if (num_blocks > std::numeric_limits<int32_t>::max()) {
    fail("block_ptr describes ", num_blocks, " blocks; the CUDA kernels handle at most 2^31 - 1");
  }
  if (gains.rows != num_blocks || gains.cols != u.cols) {
    fail("gains must have shape (B, k) = ", shape(num_blocks, u.cols), ", got ", shape(gains.rows, gains.cols));
  }
  if (num_col_tiles(x.cols) > kMaxColTiles) {
    fail("x must have at most ", kMaxColTiles * kTileD, " columns for the CUDA kernels, got ", x.cols);
  }
  if (!std::isfinite(passthrough)) fail("passthrough must be finite, got ", passthrough);

  FilterArgs a{};
  a.x = reinterpret_cast<const void*>(x.ptr);
  a.x_s0 = x.s0;
  a.x_s1 = x.s1;
  a.u = reinterpret_cast<const float*>(u.ptr);
  a.u_s0 = u.s0;
  a.u_s1 = u.s1;
  a.gains = reinterpret_cast<const float*>(gains.ptr);
  a.g_s0 = gains.s0;
  a.g_s1 = gains.s1;
  a.block_ptr = reinterpret_cast<const int64_t*>(block_ptr.first);
  a.n = x.rows;
  a.d = x.cols;
  a.k = static_cast<int>(u.cols);
  a.num_blocks = num_blocks;
  a.passthrough = static_cast<float>(passthrough);

  if (y_desc) {
    const Tensor2d y = unpack("y", *y_desc);
    check_layout(y);
    if (y.rows != x.rows || y.cols != x.cols) {
      fail("y must have x's shape ", shape(x.rows, x.cols), ", got ", shape(y.rows, y.cols));
    }
    a.y = reinterpret_cast<void*>(y.ptr);
    a.y_s0 = y.s0;
    a.y_s1 = y.s1;
    a.write_y = true;
  }
  if (gain_grad.has_value() != saved_desc.has_value()) {
    fail("gain_grad and saved_x go together (the gains' gradient needs the saved forward input); got ",
         gain_grad ? "gain_grad without saved_x" : "saved_x without gain_grad");
  }
  if (gain_grad) {
    const Tensor2d saved = unpack("saved_x", *saved_desc);
    check_layout(saved);
    if (saved.rows != x.rows || saved.cols != x.cols) {
      fail("saved_x must have x's shape ", shape(x.rows, x.cols), ", got ", shape(saved.rows, saved.cols));
    }
    const int64_t expected = num_blocks * num_col_tiles(x.cols) * u.cols;
    if (gain_grad->second != expected) {
      fail("gain_grad must hold B * ceil(d / ", kTileD, ") * k = ", num_blocks, " * ", num_col_tiles(x.cols), " * ",
           u.cols, " = ", expected, " floats, got ", gain_grad->second);
    }
    if (expected > 0 && gain_grad->first == 0) fail("gain_grad has ", expected, " elements but a null data pointer");
    a.saved = reinterpret_cast<const void*>(saved.ptr);
    a.saved_s0 = saved.s0;
    a.saved_s1 = saved.s1;
    a.gain_grad = reinterpret_cast<float*>(gain_grad->first);
  }
  return a;
}

void spectral_filter(const Desc& x, const Desc& u, const Desc& gains, const Flat& block_ptr,
                     const std::optional<Desc>& y, const std::optional<Desc>& saved_x,
                     const std::optional<Flat>& gain_grad, int dtype, double passthrough, int device,
                     std::uintptr_t stream) {
  const DType type = check_dtype(dtype);
  if (device < 0) fail("device must be a CUDA device index >= 0, got ", device);
  const FilterArgs args = make_args(x, u, gains, block_ptr, y, saved_x, gain_grad, passthrough);
  std::string error;
  {
    py::gil_scoped_release release;  // the launch is asynchronous; other Python threads may run meanwhile
    void* handle = reinterpret_cast<void*>(stream);
    switch (type) {
      case DType::kFloat32: error = launch_spectral_filter_f32(args, device, handle); break;
      case DType::kFloat16: error = launch_spectral_filter_f16(args, device, handle); break;
      case DType::kBFloat16: error = launch_spectral_filter_bf16(args, device, handle); break;
    }
  }
  if (!error.empty()) throw std::runtime_error(error);
}

bool vector_path(int dtype, const Desc& x, const std::optional<Desc>& y, const std::optional<Desc>& saved_x) {
  const DType type = check_dtype(dtype);
  FilterArgs a{};
  const auto& [xp, xr, xc, xs0, xs1] = x;
  a.x = reinterpret_cast<const void*>(xp);
  a.x_s0 = xs0;
  a.x_s1 = xs1;
  if (y) {
    a.y = reinterpret_cast<void*>(std::get<0>(*y));
    a.y_s0 = std::get<3>(*y);
    a.y_s1 = std::get<4>(*y);
    a.write_y = true;
  }
  float marker = 0.0f;
  if (saved_x) {
    a.saved = reinterpret_cast<const void*>(std::get<0>(*saved_x));
    a.saved_s0 = std::get<3>(*saved_x);
    a.saved_s1 = std::get<4>(*saved_x);
    a.gain_grad = &marker;  // only its presence matters here
  }
  return can_vectorize(a, type);
}

py::dict build_info() {
  py::dict info;
  const int version = compiled_cuda_version();
  info["cuda_version"] = std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
  py::list archs;
  std::istringstream list(compiled_arch_list());
  for (std::string item; std::getline(list, item, ',');) archs.append(std::stoi(item) / 10);
  info["archs"] = archs;
  info["tile_d"] = kTileD;
  info["max_k"] = kMaxK;
  return info;
}

}  // namespace
}  // namespace spectralkern

PYBIND11_MODULE(_C, m) {
  using namespace spectralkern;
  m.doc() = "spectralkern's compiled CUDA kernels (raw pointers + strides + the caller's stream; no libtorch).";
  m.attr("TILE_D") = kTileD;
  m.attr("MAX_K") = kMaxK;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::kFloat32);
  dtypes["float16"] = static_cast<int>(DType::kFloat16);
  dtypes["bfloat16"] = static_cast<int>(DType::kBFloat16);
  m.attr("DTYPES") = dtypes;
  m.def("spectral_filter", &spectral_filter, py::arg("x"), py::arg("U"), py::arg("gains"), py::arg("block_ptr"),
        py::arg("y"), py::arg("saved_x"), py::arg("gain_grad"), py::arg("dtype"), py::arg("passthrough"),
        py::arg("device"), py::arg("stream"),
        "y = h·x + U_b diag(g_b − h) U_bᵀ x_b per block on `stream`. Tensors are (ptr, rows, cols, stride0, "
        "stride1), block_ptr and gain_grad are (ptr, numel). y=None skips the output; saved_x with gain_grad "
        "also writes the gains' gradient partials (B, ceil(d / TILE_D), k).");
  m.def("vector_path", &vector_path, py::arg("dtype"), py::arg("x"), py::arg("y") = py::none(),
        py::arg("saved_x") = py::none(),
        "Whether a call with these operands takes the 16-byte vector load/store path.");
  m.def("build_info", &build_info, "CUDA version and architectures compiled into this binary.");
  m.def("driver_cuda_version", &driver_cuda_version,
        "CUDA version the installed driver supports (1000 * major + 10 * minor), 0 without a driver.");
}
