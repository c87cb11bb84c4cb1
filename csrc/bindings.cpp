// pybind11 module spectralkern._C: the CUDA kernels behind raw pointers, sizes, strides, dtype codes and the
// caller's stream. No libtorch and no CUDA call at import, so the module imports on machines without a GPU.
//
// A tensor travels as (data_ptr, rows, cols, stride0, stride1) with strides in elements. Every check below runs
// before any CUDA call and names the argument and the value it got.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

#include "adamw.h"
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

// `x_name`: what the caller calls the filtered input ("x"; "grad" for the spectral AdamW step).
FilterArgs make_args(const Desc& x_desc, const Desc& u_desc, const Desc& gains_desc, const Flat& block_ptr,
                     const std::optional<Desc>& y_desc, const std::optional<Desc>& saved_desc,
                     const std::optional<Flat>& gain_grad, double passthrough, const char* x_name = "x") {
  const Tensor2d x = unpack(x_name, x_desc), u = unpack("U", u_desc), gains = unpack("gains", gains_desc);
  for (const Tensor2d& t : {x, u, gains}) check_layout(t);
  if (x.rows != u.rows) fail(x_name, " must have ", u.rows, " rows (basis has ", u.rows, "), got ", x.rows);
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
    fail(x_name, " must have at most ", kMaxColTiles * kTileD, " columns for the CUDA kernels, got ", x.cols);
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

// ------------------------------------------------------------------------------------------ AdamW
const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

// (parameter dtype, state dtype) from their codes; fails unless the pair is compiled.
std::pair<DType, DType> check_adamw_dtypes(int dtype, int state_dtype) {
  const DType param = check_dtype(dtype);
  if (state_dtype != static_cast<int>(DType::kFloat32) && state_dtype != static_cast<int>(DType::kBFloat16)) {
    fail("state_dtype must be 0 (float32) or 2 (bfloat16), got ", state_dtype);
  }
  const DType state = static_cast<DType>(state_dtype);
  if (!adamw_dtypes_supported(param, state)) {
    fail("state_dtype bfloat16 is compiled for bfloat16 parameters only (float16 ones go to the Triton kernel), got "
         "dtype ", dtype_name(param));
  }
  return {param, state};
}

using Hyper = std::array<double, 7>;  // the order of spectralkern/ops/adamw_update.py `_scalars`

AdamWScalars check_hyper(const Hyper& hyper) {
  static const char* const names[] = {"1 - beta1", "beta2", "1 - beta2", "eps", "1 - lr * weight_decay",
                                      "lr / (1 - beta1^t)", "sqrt(1 - beta2^t)"};
  for (size_t i = 0; i < hyper.size(); ++i) {
    if (!std::isfinite(hyper[i])) fail("hyper[", i, "] (", names[i], ") must be finite, got ", hyper[i]);
  }
  if (!(static_cast<float>(hyper[6]) > 0.0f)) {
    fail("hyper[6] (sqrt(1 - beta2^t)) must be > 0 in float32 (step >= 1 and beta2 < 1), got ", hyper[6]);
  }
  AdamWScalars s{};
  s.one_minus_beta1 = static_cast<float>(hyper[0]);
  s.beta2 = static_cast<float>(hyper[1]);
  s.one_minus_beta2 = static_cast<float>(hyper[2]);
  s.eps = static_cast<float>(hyper[3]);
  s.decay = static_cast<float>(hyper[4]);
  s.step_size = static_cast<float>(hyper[5]);
  s.bias_correction2_sqrt = static_cast<float>(hyper[6]);
  return s;
}

Tensor2d same_shape(const char* name, const Desc& desc, const Tensor2d& grad) {
  const Tensor2d t = unpack(name, desc);
  check_layout(t);
  if (t.rows != grad.rows || t.cols != grad.cols) {
    fail(name, " must have grad's shape ", shape(grad.rows, grad.cols), ", got ", shape(t.rows, t.cols));
  }
  return t;
}

SpectralAdamWArgs make_spectral_adamw_args(const Desc& grad, const Desc& param, const Desc& exp_avg,
                                           const Desc& exp_avg_sq, const Desc& u, const Desc& gains,
                                           const Flat& block_ptr, double passthrough, const Hyper& hyper) {
  SpectralAdamWArgs a{};
  a.filter = make_args(grad, u, gains, block_ptr, std::nullopt, std::nullopt, std::nullopt, passthrough, "grad");
  const Tensor2d g = unpack("grad", grad);
  const Tensor2d p = same_shape("param", param, g), m = same_shape("exp_avg", exp_avg, g),
                 v = same_shape("exp_avg_sq", exp_avg_sq, g);
  a.p = reinterpret_cast<void*>(p.ptr);
  a.p_s0 = p.s0;
  a.p_s1 = p.s1;
  a.m = reinterpret_cast<void*>(m.ptr);
  a.m_s0 = m.s0;
  a.m_s1 = m.s1;
  a.v = reinterpret_cast<void*>(v.ptr);
  a.v_s0 = v.s0;
  a.v_s1 = v.s1;
  a.hyper = check_hyper(hyper);
  return a;
}

void spectral_adamw(const Desc& grad, const Desc& param, const Desc& exp_avg, const Desc& exp_avg_sq, const Desc& u,
                    const Desc& gains, const Flat& block_ptr, int dtype, int state_dtype, double passthrough,
                    const Hyper& hyper, int device, std::uintptr_t stream) {
  const auto [param_type, state_type] = check_adamw_dtypes(dtype, state_dtype);
  if (device < 0) fail("device must be a CUDA device index >= 0, got ", device);
  const SpectralAdamWArgs args =
      make_spectral_adamw_args(grad, param, exp_avg, exp_avg_sq, u, gains, block_ptr, passthrough, hyper);
  std::string error;
  {
    py::gil_scoped_release release;
    void* handle = reinterpret_cast<void*>(stream);
    switch (param_type) {
      case DType::kFloat32: error = launch_spectral_adamw_f32(args, state_type, device, handle); break;
      case DType::kFloat16: error = launch_spectral_adamw_f16(args, state_type, device, handle); break;
      case DType::kBFloat16: error = launch_spectral_adamw_bf16(args, state_type, device, handle); break;
    }
  }
  if (!error.empty()) throw std::runtime_error(error);
}

void adamw(const Flat& grad, const Flat& param, const Flat& exp_avg, const Flat& exp_avg_sq, int dtype,
           int state_dtype, const Hyper& hyper, int device, std::uintptr_t stream) {
  const auto [param_type, state_type] = check_adamw_dtypes(dtype, state_dtype);
  if (device < 0) fail("device must be a CUDA device index >= 0, got ", device);
  const int64_t numel = grad.second;
  if (numel < 0) fail("grad must have a non-negative number of elements, got ", numel);
  const std::pair<const char*, const Flat*> tensors[] = {
      {"grad", &grad}, {"param", &param}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (const auto& [name, t] : tensors) {
    if (t->second != numel) fail(name, " must have grad's ", numel, " elements, got ", t->second);
    if (numel > 0 && t->first == 0) fail(name, " has ", numel, " elements but a null data pointer");
  }
  PlainAdamWArgs args{};
  args.g = reinterpret_cast<const void*>(grad.first);
  args.p = reinterpret_cast<void*>(param.first);
  args.m = reinterpret_cast<void*>(exp_avg.first);
  args.v = reinterpret_cast<void*>(exp_avg_sq.first);
  args.numel = numel;
  args.hyper = check_hyper(hyper);
  std::string error;
  {
    py::gil_scoped_release release;
    error = launch_adamw(args, param_type, state_type, device, reinterpret_cast<void*>(stream));
  }
  if (!error.empty()) throw std::runtime_error(error);
}

bool spectral_adamw_vector_path(int dtype, int state_dtype, const Desc& grad, const Desc& param, const Desc& exp_avg,
                                const Desc& exp_avg_sq) {
  const auto [param_type, state_type] = check_adamw_dtypes(dtype, state_dtype);
  SpectralAdamWArgs a{};
  a.filter.x = reinterpret_cast<const void*>(std::get<0>(grad));
  a.filter.x_s0 = std::get<3>(grad);
  a.filter.x_s1 = std::get<4>(grad);
  a.p = reinterpret_cast<void*>(std::get<0>(param));
  a.p_s0 = std::get<3>(param);
  a.p_s1 = std::get<4>(param);
  a.m = reinterpret_cast<void*>(std::get<0>(exp_avg));
  a.m_s0 = std::get<3>(exp_avg);
  a.m_s1 = std::get<4>(exp_avg);
  a.v = reinterpret_cast<void*>(std::get<0>(exp_avg_sq));
  a.v_s0 = std::get<3>(exp_avg_sq);
  a.v_s1 = std::get<4>(exp_avg_sq);
  return can_vectorize(a, param_type, state_type);
}

bool adamw_vector_path(std::uintptr_t grad, std::uintptr_t param, std::uintptr_t exp_avg, std::uintptr_t exp_avg_sq) {
  PlainAdamWArgs a{};
  a.g = reinterpret_cast<const void*>(grad);
  a.p = reinterpret_cast<void*>(param);
  a.m = reinterpret_cast<void*>(exp_avg);
  a.v = reinterpret_cast<void*>(exp_avg_sq);
  return can_vectorize(a);
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
  m.def("spectral_adamw", &spectral_adamw, py::arg("grad"), py::arg("param"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("U"), py::arg("gains"), py::arg("block_ptr"), py::arg("dtype"),
        py::arg("state_dtype"), py::arg("passthrough"), py::arg("hyper"), py::arg("device"), py::arg("stream"),
        "One AdamW step of param (in place, with exp_avg / exp_avg_sq) on the filtered gradient "
        "h·grad + U_b diag(g_b − h) U_bᵀ grad_b, on `stream`. grad/param have `dtype`, the moments `state_dtype`; "
        "tensors are (ptr, rows, cols, stride0, stride1), block_ptr (ptr, numel); hyper = (1 − β1, β2, 1 − β2, ε, "
        "1 − lr·wd, lr / (1 − β1^t), √(1 − β2^t)).");
  m.def("adamw", &adamw, py::arg("grad"), py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("dtype"), py::arg("state_dtype"), py::arg("hyper"), py::arg("device"), py::arg("stream"),
        "One AdamW step of a flat, dense param (in place, with exp_avg / exp_avg_sq) on `stream`; tensors are "
        "(ptr, numel), hyper as for spectral_adamw.");
  m.def("spectral_adamw_vector_path", &spectral_adamw_vector_path, py::arg("dtype"), py::arg("state_dtype"),
        py::arg("grad"), py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        "Whether spectral_adamw with these operands takes the 16-byte vector path.");
  m.def("adamw_vector_path", &adamw_vector_path, py::arg("grad"), py::arg("param"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), "Whether adamw with these data pointers takes the 16-byte vector path.");
  m.def("build_info", &build_info, "CUDA version and architectures compiled into this binary.");
  m.def("driver_cuda_version", &driver_cuda_version,
        "CUDA version the installed driver supports (1000 * major + 10 * minor), 0 without a driver.");
}
