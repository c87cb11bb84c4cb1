// The CPU spectral filter's kernel, included once per instruction set by spectral_filter.cpp (no include guard).
// y_b = h·x_b + U_b diag(g_b − h) U_bᵀ x_b per block b (rows block_ptr[b] .. block_ptr[b+1]), and the gains'
// gradient Σ_cols (U_bᵀ x_b)(U_bᵀ s_b) when `saved` is given; x, saved, y: N x d, U: N x k, gains: B x k, all
// row-major and contiguous. Each (block, 64-byte column tile) keeps its coefficients for 8 basis vectors at a time
// in 8 vector registers: x_b's tile is read once per 8 vectors (from L1), y_b's tile updated once per 8.

constexpr int kTile = 16;   // columns of the scalar tail tile, at most (one 64-byte vector of floats)
constexpr int kChunk = 8;   // basis vectors per pass

template <typename T>
struct FilterArgs {
  const int64_t* block_ptr;
  int64_t d, k;
  const T* x;
  const T* U;
  const T* gains;
  T h;
  T* y;              // nullptr: no y (the gains' gradient only)
  const T* saved;    // nullptr: no gains' gradient
  T* gain_grad;      // B x k, accumulated into (zeroed by the caller)
};

// The last d mod lanes columns (W = 0: width w at run time), or any tile, in scalar loops.
template <typename T, int W>
inline void filter_tile(const FilterArgs<T>& a, int64_t b, int64_t s, int64_t e, int64_t c0, int w) {
  const int64_t d = a.d, k = a.k;
  if (a.y != nullptr) {
    for (int64_t i = s; i < e; ++i) {
      const T* xr = a.x + i * d + c0;
      T* yr = a.y + i * d + c0;
      for (int c = 0; c < (W ? W : w); ++c) yr[c] = a.h * xr[c];
    }
  }
  for (int64_t j0 = 0; j0 < k; j0 += kChunk) {
    const int kc = static_cast<int>(std::min<int64_t>(kChunk, k - j0));
    T acc[kChunk][kTile] = {};
    T sacc[kChunk][kTile] = {};
    for (int64_t i = s; i < e; ++i) {
      T u[kChunk] = {};
      for (int jj = 0; jj < kc; ++jj) u[jj] = a.U[i * k + j0 + jj];
      const T* xr = a.x + i * d + c0;
      for (int jj = 0; jj < kChunk; ++jj) {
#pragma omp simd
        for (int c = 0; c < (W ? W : w); ++c) acc[jj][c] += u[jj] * xr[c];
      }
      if (a.saved != nullptr) {
        const T* sr = a.saved + i * d + c0;
        for (int jj = 0; jj < kChunk; ++jj) {
#pragma omp simd
          for (int c = 0; c < (W ? W : w); ++c) sacc[jj][c] += u[jj] * sr[c];
        }
      }
    }
    if (a.saved != nullptr) {
      for (int jj = 0; jj < kc; ++jj) {
        T dot = 0;
        for (int c = 0; c < (W ? W : w); ++c) dot += acc[jj][c] * sacc[jj][c];
        a.gain_grad[b * k + j0 + jj] += dot;
      }
    }
    if (a.y == nullptr) continue;
    for (int jj = 0; jj < kChunk; ++jj) {
      const T g = jj < kc ? a.gains[b * k + j0 + jj] - a.h : T(0);
#pragma omp simd
      for (int c = 0; c < kTile; ++c) acc[jj][c] *= g;
    }
    for (int64_t i = s; i < e; ++i) {
      T u[kChunk] = {};
      for (int jj = 0; jj < kc; ++jj) u[jj] = a.U[i * k + j0 + jj];
      T* yr = a.y + i * d + c0;
      for (int jj = 0; jj < kChunk; ++jj) {
#pragma omp simd
        for (int c = 0; c < (W ? W : w); ++c) yr[c] += u[jj] * acc[jj][c];
      }
    }
  }
}

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2 ones
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};

// A full tile of one 64-byte vector of columns, the coefficients of kChunk basis vectors in kChunk vector
// registers (k is a multiple of kChunk: the caller pads U and the gains with zero columns).
template <typename T, bool SAVED>
inline void filter_tile_vector(const FilterArgs<T>& a, int64_t b, int64_t s, int64_t e, int64_t c0) {
  using V = typename VecOf<T>::type;
  const int64_t d = a.d, k = a.k;
  if (a.y != nullptr) {
    for (int64_t i = s; i < e; ++i) {
      V xv;
      std::memcpy(&xv, a.x + i * d + c0, sizeof(V));
      const V yv = a.h * xv;
      std::memcpy(a.y + i * d + c0, &yv, sizeof(V));
    }
  }
  for (int64_t j0 = 0; j0 < k; j0 += kChunk) {
    V acc[kChunk], sacc[SAVED ? kChunk : 1];
#pragma GCC unroll 8
    for (int jj = 0; jj < kChunk; ++jj) acc[jj] = V{};
    if (SAVED) {
#pragma GCC unroll 8
      for (int jj = 0; jj < kChunk; ++jj) sacc[jj] = V{};
    }
    for (int64_t i = s; i < e; ++i) {
      const T* ur = a.U + i * k + j0;
      V xv;
      std::memcpy(&xv, a.x + i * d + c0, sizeof(V));
#pragma GCC unroll 8
      for (int jj = 0; jj < kChunk; ++jj) acc[jj] += ur[jj] * xv;
      if (SAVED) {
        V sv;
        std::memcpy(&sv, a.saved + i * d + c0, sizeof(V));
#pragma GCC unroll 8
        for (int jj = 0; jj < kChunk; ++jj) sacc[jj] += ur[jj] * sv;
      }
    }
    if (SAVED) {
      for (int jj = 0; jj < kChunk; ++jj) {
        const V prod = acc[jj] * sacc[jj];
        T dot = 0;
        for (size_t c = 0; c < sizeof(V) / sizeof(T); ++c) dot += prod[c];
        a.gain_grad[b * k + j0 + jj] += dot;
      }
    }
    if (a.y == nullptr) continue;
#pragma GCC unroll 8
    for (int jj = 0; jj < kChunk; ++jj) acc[jj] *= a.gains[b * k + j0 + jj] - a.h;
    for (int64_t i = s; i < e; ++i) {
      const T* ur = a.U + i * k + j0;
      V yv;
      std::memcpy(&yv, a.y + i * d + c0, sizeof(V));
#pragma GCC unroll 8
      for (int jj = 0; jj < kChunk; ++jj) yv += ur[jj] * acc[jj];
      std::memcpy(a.y + i * d + c0, &yv, sizeof(V));
    }
  }
}

template <typename T>
void filter_blocks(const FilterArgs<T>& a, int64_t first_block, int64_t last_block) {
  constexpr int64_t lanes = 64 / sizeof(T);
  for (int64_t b = first_block; b < last_block; ++b) {
    const int64_t s = a.block_ptr[b], e = a.block_ptr[b + 1];
    if (e <= s) continue;
    int64_t c0 = 0;
    for (; c0 + lanes <= a.d; c0 += lanes) {
      if (a.saved != nullptr) {
        filter_tile_vector<T, true>(a, b, s, e, c0);
      } else {
        filter_tile_vector<T, false>(a, b, s, e, c0);
      }
    }
    if (c0 < a.d) filter_tile<T, 0>(a, b, s, e, c0, static_cast<int>(a.d - c0));  // the last columns, scalar
  }
}
