// The CPU module's entry points (bound in module.cpp). Arrays are passed as raw addresses of contiguous torch
// tensors; spectralkern/eigen/_native.py owns the shapes and dtypes.
#pragma once

#include <cstdint>
#include <string>

namespace spectralkern_native {

// The lowest eigenpairs of items [first_item, first_item + num_items) of the symmetric CSR matrix L (see
// small_lanczos.cpp). dtype: "float32" or "float64" (L's values, the start vectors and the outputs).
void lowest_eigenpairs(const std::string& dtype, int64_t first_item, int64_t num_items, int64_t n_pad,
                       uintptr_t sizes, uintptr_t node_map, uintptr_t crow, uintptr_t col, uintptr_t val,
                       uintptr_t item_of, uintptr_t local_of, uintptr_t want, int64_t kw, uintptr_t start, double tol,
                       double norm, int guards, int64_t max_steps, double semi_orthogonality, uint64_t seed,
                       int threads, uintptr_t values, uintptr_t vectors, uintptr_t residuals, uintptr_t products);

// labels[v] = the connected component of node v in the pattern of an n x n CSR matrix (int64 crow, col), numbered
// 0, 1, ... in order of their first node.
void connected_components(int64_t n, const int64_t* crow, const int64_t* col, int64_t* labels);

}  // namespace spectralkern_native
