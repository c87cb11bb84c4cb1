// pybind11 bindings of spectralkern._native (the CPU module). Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "native.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "spectralkern's compiled CPU kernels (see csrc/native/).";
  m.def("lowest_eigenpairs", &spectralkern_native::lowest_eigenpairs,
        "Lowest eigenpairs of items [first_item, first_item + num_items) of L (CSR), item g being the nodes "
        "node_map[g, :sizes[g]]; one item per thread (raw pointers to whole arrays; see "
        "spectralkern/eigen/_native.py).",
        py::arg("dtype"), py::arg("num_nodes"), py::arg("first_item"), py::arg("num_items"), py::arg("n_pad"),
        py::arg("sizes"), py::arg("node_map"), py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("want"), py::arg("kw"), py::arg("start"), py::arg("tol"), py::arg("norm"),
        py::arg("guards"), py::arg("max_steps"), py::arg("semi_orthogonality"), py::arg("seed"), py::arg("threads"), py::arg("values"),
        py::arg("vectors"), py::arg("residuals"), py::arg("products"),
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "connected_components",
      [](int64_t n, uintptr_t crow, uintptr_t col, uintptr_t labels) {
        if (n < 0) throw std::invalid_argument("connected_components: n must be >= 0");
        spectralkern_native::connected_components(n, reinterpret_cast<const int64_t*>(crow),
                                                  reinterpret_cast<const int64_t*>(col),
                                                  reinterpret_cast<int64_t*>(labels));
      },
      "Component label of every node of an n x n CSR pattern (int64 crow, col; labels: int64[n]).", py::arg("n"),
      py::arg("crow"), py::arg("col"), py::arg("labels"), py::call_guard<py::gil_scoped_release>());
  m.def("spectral_filter", &spectralkern_native::spectral_filter,
        "y = h x + U diag(g - h) U^T x per block and/or the gains' gradient (see spectralkern/ops/spectral_filter.py "
        "_launch_native: contiguous arrays by address, 0 for an absent y / saved / gain_grad).",
        py::arg("dtype"), py::arg("num_blocks"), py::arg("block_ptr"), py::arg("d"), py::arg("k"), py::arg("x"),
        py::arg("U"), py::arg("gains"), py::arg("h"), py::arg("y"), py::arg("saved"), py::arg("gain_grad"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "csr_summary",
      [](const std::string& dtype, int64_t n, uintptr_t crow, uintptr_t col, uintptr_t val, int64_t num_blocks,
         uintptr_t block_ptr, uint64_t seed) {
        if (n < 0 || num_blocks < 0) throw std::invalid_argument("csr_summary: n and num_blocks must be >= 0");
        spectralkern_native::CsrSummary s;
        {
          py::gil_scoped_release release;
          s = spectralkern_native::csr_summary(dtype, n, reinterpret_cast<const int64_t*>(crow),
                                               reinterpret_cast<const int64_t*>(col),
                                               reinterpret_cast<const void*>(val), num_blocks,
                                               reinterpret_cast<const int64_t*>(block_ptr), seed);
        }
        py::dict out;
        out["nonfinite"] = s.nonfinite;
        out["max_row_nnz"] = s.max_row_nnz;
        out["max_abs_row_sum"] = s.max_abs_row_sum;
        out["max_gershgorin_upper"] = s.max_gershgorin_upper;
        out["crosses_blocks"] = s.crosses_blocks;
        out["ytLx"] = s.ytLx;
        out["xtLy"] = s.xtLy;
        return out;
      },
      "One pass over an n x n CSR matrix (int64 crow, col; values of `dtype`) for the eigensolver's input checks: "
      "a dict of nonfinite, max_row_nnz, max_abs_row_sum, max_gershgorin_upper, crosses_blocks (of the int64 "
      "block_ptr, num_blocks + 1 offsets; num_blocks = 0: none) and the symmetry probe ytLx, xtLy.",
      py::arg("dtype"), py::arg("n"), py::arg("crow"), py::arg("col"), py::arg("val"), py::arg("num_blocks"),
      py::arg("block_ptr"), py::arg("seed"));
}
