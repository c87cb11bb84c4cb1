// One pass over a CSR matrix for the eigensolver's input checks (spectralkern/eigen/_problem.py): non-finite
// entries, the longest row, Gershgorin bounds, whether an entry crosses the given blocks, and a symmetry probe
// y'(L x) against x'(L y) for two pseudo-random unit vectors. The same checks as torch ops took ~40 ms on the
// bench's 131072-node Laplacian (2.8M entries: seven passes and a randn of 2N values), a fifth of a whole solve.
#include "native.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace spectralkern_native {
namespace {

// splitmix64 of (seed, i) mapped to [-1, 1): a probe entry that does not depend on the pass order
double probe_entry(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53 * 2.0 - 1.0;
}

template <typename T>
CsrSummary summarize(int64_t n, const int64_t* crow, const int64_t* col, const T* val, int64_t num_blocks,
                     const int64_t* block_ptr, uint64_t seed) {
  CsrSummary out;
  std::vector<double> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
  double xx = 0, yy = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = probe_entry(seed, 2 * static_cast<uint64_t>(i));
    y[i] = probe_entry(seed, 2 * static_cast<uint64_t>(i) + 1);
    xx += x[i] * x[i];
    yy += y[i] * y[i];
  }
  int64_t block = 0;  // the block of row r (blocks given by block_ptr; num_blocks = 0: no blocks to cross)
  double ytLx = 0, xtLy = 0;
  for (int64_t r = 0; r < n; ++r) {
    while (block < num_blocks && block_ptr[block + 1] <= r) ++block;
    const int64_t lo = num_blocks > 0 ? block_ptr[block] : 0, hi = num_blocks > 0 ? block_ptr[block + 1] : n;
    double abs_sum = 0, diagonal = 0, row_x = 0, row_y = 0;
    for (int64_t t = crow[r]; t < crow[r + 1]; ++t) {
      const double v = static_cast<double>(val[t]);
      const int64_t c = col[t];
      if (!std::isfinite(v)) ++out.nonfinite;
      if (c < lo || c >= hi) out.crosses_blocks = true;
      abs_sum += std::fabs(v);
      if (c == r) diagonal += v;
      row_x += v * x[c];
      row_y += v * y[c];
    }
    ytLx += y[r] * row_x;
    xtLy += x[r] * row_y;
    out.max_row_nnz = std::max(out.max_row_nnz, crow[r + 1] - crow[r]);
    out.max_abs_row_sum = std::max(out.max_abs_row_sum, abs_sum);
    out.max_gershgorin_upper = std::max(out.max_gershgorin_upper, diagonal + (abs_sum - std::fabs(diagonal)));
  }
  const double scale = xx > 0 && yy > 0 ? 1.0 / std::sqrt(xx * yy) : 0.0;
  out.ytLx = ytLx * scale;
  out.xtLy = xtLy * scale;
  return out;
}

}  // namespace

CsrSummary csr_summary(const std::string& dtype, int64_t n, const int64_t* crow, const int64_t* col,
                       const void* val, int64_t num_blocks, const int64_t* block_ptr, uint64_t seed) {
  if (dtype == "float64")
    return summarize(n, crow, col, static_cast<const double*>(val), num_blocks, block_ptr, seed);
  if (dtype == "float32")
    return summarize(n, crow, col, static_cast<const float*>(val), num_blocks, block_ptr, seed);
  throw std::invalid_argument("csr_summary: dtype must be 'float32' or 'float64', got " + dtype);
}

}  // namespace spectralkern_native
