// The CPU module's entry points (bound in module.cpp). Arrays are passed as raw addresses of contiguous torch
// tensors; spectralkern/eigen/_native.py owns the shapes and dtypes.
#pragma once

#include <cstdint>
#include <string>

namespace spectralkern_native {

// The lowest eigenpairs of items [first_item, first_item + num_items) of the symmetric CSR matrix L (see
// small_lanczos.cpp). dtype: "float32" or "float64" (L's values, the start vectors and the outputs).
void lowest_eigenpairs(const std::string& dtype, int64_t num_nodes, int64_t first_item, int64_t num_items,
                       int64_t n_pad, uintptr_t sizes, uintptr_t node_map, uintptr_t crow, uintptr_t col,
                       uintptr_t val, uintptr_t want, int64_t kw, uintptr_t start, double tol, double norm,
                       int guards, int64_t max_steps, double semi_orthogonality, uint64_t seed, int threads,
                       uintptr_t values, uintptr_t vectors, uintptr_t residuals, uintptr_t products);

// What the eigensolver's input checks need of an n x n CSR matrix (csr_checks.cpp): one pass over its entries.
struct CsrSummary {
  int64_t nonfinite = 0;              // NaN / Inf values
  int64_t max_row_nnz = 0;
  double max_abs_row_sum = 0;         // max_r sum_c |L_rc|
  double max_gershgorin_upper = 0;    // max_r L_rr + sum_{c != r} |L_rc|: an upper bound on the eigenvalues
  bool crosses_blocks = false;        // an entry (r, c) with r and c in different blocks of block_ptr
  double ytLx = 0, xtLy = 0;          // y'(L x) and x'(L y) for two pseudo-random unit vectors (seeded)
};

// dtype: "float32" or "float64" (val); block_ptr: num_blocks + 1 offsets (num_blocks = 0: no blocks).
CsrSummary csr_summary(const std::string& dtype, int64_t n, const int64_t* crow, const int64_t* col,
                       const void* val, int64_t num_blocks, const int64_t* block_ptr, uint64_t seed);

// labels[v] = the connected component of node v in the pattern of an n x n CSR matrix (int64 crow, col), numbered
// 0, 1, ... in order of their first node.
void connected_components(int64_t n, const int64_t* crow, const int64_t* col, int64_t* labels);

// y = h·x + U diag(g − h) Uᵀ x per block, and/or the gains' gradient (spectral_filter.cpp); dtype "float32" or
// "float64"; x, U, gains, y, saved, gain_grad: addresses of contiguous arrays (y, saved, gain_grad: 0 for none).
void spectral_filter(const std::string& dtype, int64_t num_blocks, uintptr_t block_ptr, int64_t d, int64_t k,
                     uintptr_t x, uintptr_t U, uintptr_t gains, double h, uintptr_t y, uintptr_t saved,
                     uintptr_t gain_grad, int threads);

}  // namespace spectralkern_native
