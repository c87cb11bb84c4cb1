// The solver of small_lanczos.cpp. Included twice there, inside two namespaces, to compile it for two instruction
// sets (baseline x86-64 / other CPUs, and AVX2 + FMA chosen at run time); so it has no include guard and no
// includes of its own.

// splitmix64: a stream per item, so results do not depend on which thread solved the item.
struct Random {
  uint64_t state;
  explicit Random(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53 * 2.0 - 1.0; }  // [-1, 1)
};

// Dot product in double. `omp simd` (compiled with -fopenmp-simd: no OpenMP runtime) lets the compiler
// vectorise the reduction without -ffast-math.
template <typename A, typename B>
double dot(const A* a, const B* b, int n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

// y += a x
template <typename T>
void axpy(double a, const T* x, double* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += a * static_cast<double>(x[i]);
}

// coef[r] = V[r] . w for the `rows` rows of V (row-major, n columns), four rows per sweep over w.
template <typename T>
void project(const T* V, int rows, int n, const double* w, double* coef) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T *q0 = V + static_cast<size_t>(r) * n, *q1 = q0 + n, *q2 = q1 + n, *q3 = q2 + n;
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int i = 0; i < n; ++i) {
      const double x = w[i];
      s0 += static_cast<double>(q0[i]) * x;
      s1 += static_cast<double>(q1[i]) * x;
      s2 += static_cast<double>(q2[i]) * x;
      s3 += static_cast<double>(q3[i]) * x;
    }
    coef[r] = s0;
    coef[r + 1] = s1;
    coef[r + 2] = s2;
    coef[r + 3] = s3;
  }
  for (; r < rows; ++r) coef[r] = dot(V + static_cast<size_t>(r) * n, w, n);
}

// y += scale * sum_r coef[r] V[r], four rows per sweep over y (one store of y per four rows: the single-row
// axpy loop was bound by its stores).
template <typename T>
void combine(const T* V, int rows, int n, const double* coef, double scale, double* y) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T *q0 = V + static_cast<size_t>(r) * n, *q1 = q0 + n, *q2 = q1 + n, *q3 = q2 + n;
    const double c0 = scale * coef[r], c1 = scale * coef[r + 1], c2 = scale * coef[r + 2], c3 = scale * coef[r + 3];
#pragma omp simd
    for (int i = 0; i < n; ++i)
      y[i] += c0 * static_cast<double>(q0[i]) + c1 * static_cast<double>(q1[i]) + c2 * static_cast<double>(q2[i]) +
              c3 * static_cast<double>(q3[i]);
  }
  for (; r < rows; ++r) axpy(scale * coef[r], V + static_cast<size_t>(r) * n, y, n);
}

// L's CSR (global node numbering) and where every node belongs: item_of[v] (-1: no item) and its row local_of[v].
template <typename T>
struct Graph {
  const int64_t* crow;
  const int64_t* col;
  const T* val;
  const int64_t* item_of;
  const int64_t* local_of;
};

// One item's submatrix of L in local CSR form, copied out of L once per item (entries to other items dropped:
// items are unions of connected components, so none exist).
template <typename T>
struct Item {
  std::vector<int32_t> crow, col;
  std::vector<T> val;
  int n = 0;

  void load(const Graph<T>& graph, const int64_t* nodes, int size, int64_t self) {
    n = size;
    crow.assign(1, 0);
    col.clear();
    val.clear();
    for (int r = 0; r < n; ++r) {
      const int64_t node = nodes[r];
      for (int64_t t = graph.crow[node]; t < graph.crow[node + 1]; ++t) {
        const int64_t c = graph.col[t];
        if (graph.item_of[c] != self) continue;
        col.push_back(static_cast<int32_t>(graph.local_of[c]));
        val.push_back(graph.val[t]);
      }
      crow.push_back(static_cast<int32_t>(col.size()));
    }
  }

  // y = L x. Four partial sums per row: one sum's chain of dependent FMAs (~20 per row here) was the bottleneck.
  void apply(const T* x, double* y) const {
    const int32_t* c = col.data();
    const T* v = val.data();
    for (int r = 0; r < n; ++r) {
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int32_t t = crow[r];
      const int32_t end = crow[r + 1];
      for (; t + 4 <= end; t += 4) {
        s0 += static_cast<double>(v[t]) * x[c[t]];
        s1 += static_cast<double>(v[t + 1]) * x[c[t + 1]];
        s2 += static_cast<double>(v[t + 2]) * x[c[t + 2]];
        s3 += static_cast<double>(v[t + 3]) * x[c[t + 3]];
      }
      for (; t < end; ++t) s0 += static_cast<double>(v[t]) * x[c[t]];
      y[r] = (s0 + s1) + (s2 + s3);
    }
  }

  // LY = L Y for the m rows of Y (row-major, m x n) in one pass over L: in the transposed copy the m values of a
  // column are contiguous, so each stored entry costs one vectorised m-wide multiply-add instead of m gathers.
  // (Yt, LYt: scratch.)
  void apply_rows(const double* Y, int m, double* LY, std::vector<double>& Yt, std::vector<double>& LYt) const {
    Yt.resize(static_cast<size_t>(n) * m);
    LYt.assign(static_cast<size_t>(n) * m, 0.0);
    for (int i = 0; i < m; ++i)
      for (int r = 0; r < n; ++r) Yt[static_cast<size_t>(r) * m + i] = Y[static_cast<size_t>(i) * n + r];
    for (int r = 0; r < n; ++r) {
      double* out = LYt.data() + static_cast<size_t>(r) * m;
      for (int32_t t = crow[r]; t < crow[r + 1]; ++t) {
        const double v = static_cast<double>(val[t]);
        const double* in = Yt.data() + static_cast<size_t>(col[t]) * m;
#pragma omp simd
        for (int i = 0; i < m; ++i) out[i] += v * in[i];
      }
    }
    for (int i = 0; i < m; ++i)
      for (int r = 0; r < n; ++r) LY[static_cast<size_t>(i) * n + r] = LYt[static_cast<size_t>(r) * m + i];
  }
};

struct Options {
  double tol;         // absolute residual tolerance
  double norm;        // bound on |L|, the scale of "rounding noise"
  double eps;         // unit roundoff of the storage dtype
  int guards;         // Ritz pairs tracked beyond the wanted ones
  int max_steps;      // Lanczos steps per item at most (<= n)
  double semi_orthogonality;  // estimated |q_i' q_k| that triggers a full Gram-Schmidt pass; 0: one every step
};

// The eigenvalues first..first+count-1 (0-based, ascending) of the symmetric tridiagonal (alpha, beta) of size m,
// each to `relative` times the spectrum's scale: multisection on Sturm counts (the number of negative pivots of
// T - x I). Every value's bracket is probed at `points` interior points per sweep, all count x points Sturm
// sequences advancing together so that their divisions pipeline and vectorise; points = 8 / count (at least 1:
// bisection) keeps a few values -- the checkpoints' single top value -- from running one latency-bound chain.
void tridiagonal_eigenvalues(const double* alpha, const double* beta, int m, int first, int count, double relative,
                             std::vector<double>& out, std::vector<double>& hi, std::vector<double>& beta2) {
  double glo = alpha[0], ghi = alpha[0];
  beta2.resize(m);
  for (int i = 0; i < m; ++i) {
    const double radius = (i > 0 ? std::fabs(beta[i - 1]) : 0.0) + (i + 1 < m ? std::fabs(beta[i]) : 0.0);
    glo = std::min(glo, alpha[i] - radius);
    ghi = std::max(ghi, alpha[i] + radius);
    beta2[i] = i + 1 < m ? beta[i] * beta[i] : 0.0;
  }
  const double scale = std::max(std::fabs(glo), std::fabs(ghi)) + std::numeric_limits<double>::min();
  const double tiny = std::numeric_limits<double>::epsilon() * scale;
  const double width = std::max(relative, 2 * std::numeric_limits<double>::epsilon()) * scale;
  const int points = std::max(1, 8 / std::max(count, 1));
  const int lanes = count * points;
  const int sweeps =
      static_cast<int>(std::ceil(std::log2((ghi - glo) / width + 1.0) / std::log2(points + 1.0))) + 1;
  out.assign(count, glo);  // lower ends
  hi.assign(count, ghi);
  thread_local std::vector<double> q, x;   // scratch, reused across calls
  thread_local std::vector<int> below;
  q.resize(lanes);
  x.resize(lanes);
  below.resize(lanes);
  for (int sweep = 0; sweep < sweeps; ++sweep) {
    for (int k = 0; k < count; ++k)
      for (int p = 0; p < points; ++p)
        x[k * points + p] = out[k] + (hi[k] - out[k]) * (p + 1) / (points + 1);
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      q[l] = alpha[0] - x[l];
      below[l] = q[l] < 0;
    }
    for (int i = 1; i < m; ++i) {
      const double a = alpha[i], b2 = beta2[i - 1];
#pragma omp simd
      for (int l = 0; l < lanes; ++l) {
        const double pivot = q[l] == 0.0 ? tiny : q[l];
        q[l] = a - x[l] - b2 / pivot;
        below[l] += q[l] < 0;
      }
    }
    // value first + k lies above every point with at most first + k eigenvalues below it, and below the others
    for (int k = 0; k < count; ++k)
      for (int p = 0; p < points; ++p) {
        const int l = k * points + p;
        if (below[l] > first + k)
          hi[k] = std::min(hi[k], x[l]);
        else
          out[k] = std::max(out[k], x[l]);
      }
  }
  for (int k = 0; k < count; ++k) out[k] = 0.5 * (out[k] + hi[k]);
}

// The scale of the tridiagonal T (alpha, beta) of size m: max_i |alpha_i| + 2 |beta_i| >= |T|.
double tridiagonal_scale(const double* alpha, const double* beta, int m) {
  double scale = 0;
  for (int i = 0; i < m; ++i) scale = std::max(scale, std::fabs(alpha[i]) + 2 * std::fabs(beta[i]));
  return scale;
}

// The replacement for a zero pivot of T - shift I: eps times T's scale, never so small that its reciprocal
// overflows (T = 0: an item whose stored entries are all zero).
double pivot_floor(double scale) {
  return std::max(std::numeric_limits<double>::epsilon() * scale,
                  std::numeric_limits<double>::min() / std::numeric_limits<double>::epsilon());
}

// x <- x / |x| (scaled by its largest entry first, so that inverse iteration's huge entries do not overflow the
// sum of squares). False, x untouched, when x is zero or not finite.
bool make_unit(double* x, int m) {
  double big = 0;
  for (int t = 0; t < m; ++t) big = std::max(big, std::fabs(x[t]));
  if (!(big > 0) || !std::isfinite(big)) return false;
  for (int t = 0; t < m; ++t) x[t] /= big;
  const double inv = 1.0 / std::sqrt(dot(x, x, m));
  for (int t = 0; t < m; ++t) x[t] *= inv;
  return true;
}

// LU factorisation of T - shift I with partial pivoting (T symmetric tridiagonal (alpha, beta) of size m; the factor
// has two superdiagonals), kept for several solves: inverse iteration solves twice with one factorisation. A zero
// pivot is replaced by `tiny`.
struct ShiftedTridiagonal {
  std::vector<double> inverse_pivot, u1, u2, mult;
  std::vector<char> swapped;
  int m = 0;

  void factor(const double* alpha, const double* beta, int size, double shift, double tiny) {
    m = size;
    inverse_pivot.resize(m);
    u1.resize(m);
    u2.resize(m);
    mult.resize(m);
    swapped.resize(m);
    // the row being eliminated: [a, b, c] at columns i, i + 1, i + 2
    double a = alpha[0] - shift, b = m > 1 ? beta[0] : 0.0, c = 0.0;
    for (int i = 0; i < m - 1; ++i) {
      const double sub = beta[i], diag = alpha[i + 1] - shift, super = i + 1 < m - 1 ? beta[i + 1] : 0.0;
      if (std::fabs(sub) > std::fabs(a)) {  // row i + 1 becomes the pivot row
        const double l = a / sub;
        swapped[i] = 1;
        mult[i] = l;
        inverse_pivot[i] = 1.0 / sub;
        u1[i] = diag;
        u2[i] = super;
        a = b - l * diag;
        b = c - l * super;
      } else {
        if (a == 0.0) a = tiny;
        const double l = sub / a;
        swapped[i] = 0;
        mult[i] = l;
        inverse_pivot[i] = 1.0 / a;
        u1[i] = b;
        u2[i] = c;
        a = diag - l * b;
        b = super - l * c;
      }
      c = 0.0;
    }
    inverse_pivot[m - 1] = 1.0 / (a == 0.0 ? tiny : a);
  }

  // x <- (T - shift I)^-1 x
  void solve(double* x) const {
    for (int i = 0; i < m - 1; ++i) {
      if (swapped[i]) std::swap(x[i], x[i + 1]);
      x[i + 1] -= mult[i] * x[i];
    }
    for (int i = m - 1; i >= 0; --i) {
      double s = x[i];
      if (i + 1 < m) s -= u1[i] * x[i + 1];
      if (i + 2 < m) s -= u2[i] * x[i + 2];
      x[i] = s * inverse_pivot[i];
    }
  }
};

// Y[o] = sum_r coef[o * rows + r] V[r] for o < outputs (Y: outputs x n, row-major, overwritten). Column tiles keep
// every output's piece in cache while V streams through once (one combine() per output would read a 4096-node
// item's 22 MB basis once per Ritz vector).
template <typename T>
void combine_rows(const T* V, int rows, int n, const double* coef, int outputs, double* Y) {
  constexpr int kTile = 256;
  for (int c = 0; c < n; c += kTile) {
    const int width = std::min(kTile, n - c);
    for (int o = 0; o < outputs; ++o) std::fill_n(Y + static_cast<size_t>(o) * n + c, width, 0.0);
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
      const T* q0 = V + static_cast<size_t>(r) * n + c;
      const T *q1 = q0 + n, *q2 = q1 + n, *q3 = q2 + n;
      for (int o = 0; o < outputs; ++o) {
        const double* a = coef + static_cast<size_t>(o) * rows + r;
        const double a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
        double* y = Y + static_cast<size_t>(o) * n + c;
#pragma omp simd
        for (int i = 0; i < width; ++i)
          y[i] += a0 * static_cast<double>(q0[i]) + a1 * static_cast<double>(q1[i]) + a2 * static_cast<double>(q2[i]) +
                  a3 * static_cast<double>(q3[i]);
      }
    }
    for (; r < rows; ++r)
      for (int o = 0; o < outputs; ++o)
        axpy(coef[static_cast<size_t>(o) * rows + r], V + static_cast<size_t>(r) * n + c,
             Y + static_cast<size_t>(o) * n + c, width);
  }
}

// In place G = R R' (m x m row-major; R lower triangular, the upper part left as it was). Returns the smallest
// ratio of a squared pivot to its diagonal entry of G: 1 for orthogonal rows behind G, 0 for dependent ones.
double cholesky(double* G, int m) {
  double independence = 1.0;
  for (int i = 0; i < m; ++i) {
    for (int k = 0; k < i; ++k) {
      double s = G[i * m + k];
      for (int t = 0; t < k; ++t) s -= G[i * m + t] * G[k * m + t];
      G[i * m + k] = s / G[k * m + k];
    }
    const double diagonal = G[i * m + i];
    double s = diagonal;
    for (int t = 0; t < i; ++t) s -= G[i * m + t] * G[i * m + t];
    independence = std::min(independence, s > 0 && diagonal > 0 ? s / diagonal : 0.0);
    G[i * m + i] = std::sqrt(std::max(s, std::numeric_limits<double>::min()));
  }
  return independence;
}

// B <- R^-1 B (R: the lower triangle of an m x m row-major matrix; B: m x m row-major), forward substitution.
void lower_solve(const double* R, int m, double* B) {
  for (int i = 0; i < m; ++i) {
    double* row = B + static_cast<size_t>(i) * m;
    for (int t = 0; t < i; ++t) axpy(-R[i * m + t], B + static_cast<size_t>(t) * m, row, m);
    const double inv = 1.0 / R[i * m + i];
    for (int c = 0; c < m; ++c) row[c] *= inv;
  }
}

// B <- R^-T B (R as in lower_solve), back substitution.
void lower_transposed_solve(const double* R, int m, double* B) {
  for (int i = m - 1; i >= 0; --i) {
    double* row = B + static_cast<size_t>(i) * m;
    for (int t = i + 1; t < m; ++t) axpy(-R[t * m + i], B + static_cast<size_t>(t) * m, row, m);
    const double inv = 1.0 / R[i * m + i];
    for (int c = 0; c < m; ++c) row[c] *= inv;
  }
}

// A <- (A + A') / 2 (m x m row-major): rounding leaves the projections slightly asymmetric.
void symmetrize(double* A, int m) {
  for (int i = 0; i < m; ++i)
    for (int k = 0; k < i; ++k) A[i * m + k] = A[k * m + i] = 0.5 * (A[i * m + k] + A[k * m + i]);
}

void transpose(double* A, int m) {
  for (int i = 0; i < m; ++i)
    for (int k = i + 1; k < m; ++k) std::swap(A[i * m + k], A[k * m + i]);
}

// Eigenvalues (ascending) and eigenvectors (columns of Z, m x m row-major) of the symmetric m x m matrix A
// (row-major, destroyed) by cyclic Jacobi rotations. Meant for the final Rayleigh-Ritz projection: small (m = the
// tracked pairs) and nearly diagonal already, where Jacobi converges in a few sweeps and is accurate.
void symmetric_eigen(double* A, int m, std::vector<double>& values, std::vector<double>& Z) {
  Z.assign(static_cast<size_t>(m) * m, 0.0);
  for (int i = 0; i < m; ++i) Z[i * m + i] = 1.0;
  const double eps = std::numeric_limits<double>::epsilon();
  for (int sweep = 0; sweep < 32; ++sweep) {
    double off = 0, total = 0;
    for (int i = 0; i < m; ++i)
      for (int k = 0; k < m; ++k) {
        const double a2 = A[i * m + k] * A[i * m + k];
        total += a2;
        if (i != k) off += a2;
      }
    if (off <= eps * eps * total) break;
    for (int p = 0; p < m - 1; ++p) {
      for (int q = p + 1; q < m; ++q) {
        const double apq = A[p * m + q];
        if (apq == 0.0) continue;
        // the rotation J in the (p, q) plane that zeroes (J' A J)[p, q]
        const double theta = (A[q * m + q] - A[p * m + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int r = 0; r < m; ++r) {  // columns p, q of A and Z
          const double arp = A[r * m + p], arq = A[r * m + q];
          A[r * m + p] = c * arp - s * arq;
          A[r * m + q] = s * arp + c * arq;
          const double zrp = Z[r * m + p], zrq = Z[r * m + q];
          Z[r * m + p] = c * zrp - s * zrq;
          Z[r * m + q] = s * zrp + c * zrq;
        }
        for (int r = 0; r < m; ++r) {  // rows p, q of A
          const double apr = A[p * m + r], aqr = A[q * m + r];
          A[p * m + r] = c * apr - s * aqr;
          A[q * m + r] = s * apr + c * aqr;
        }
      }
    }
  }
  std::vector<int> order(m);
  for (int i = 0; i < m; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return A[a * m + a] < A[b * m + b]; });
  values.resize(m);
  std::vector<double> sorted(static_cast<size_t>(m) * m);
  for (int i = 0; i < m; ++i) {
    values[i] = A[order[i] * m + order[i]];
    for (int r = 0; r < m; ++r) sorted[r * m + i] = Z[r * m + order[i]];
  }
  Z.swap(sorted);
}

template <typename T>
class Solver {
 public:
  explicit Solver(const Options& options) : opt_(options) {}

  // Solves one item; writes `want` pairs: values[want], vectors[n_pad x kw] (row-major, column c of row r at
  // r * kw + c) and the explicit residuals[want]. Returns the products by L it took.
  int64_t solve(const Item<T>& item, int want, int kw, const T* start, uint64_t seed, T* values, T* vectors,
                double* residuals) {
    const int n = item.n;
    Random rng(seed);
    products_ = 0;
    // Partial reorthogonalisation limits the attainable residual to a small multiple of sqrt(eps) |L| (the
    // Gram-Schmidt coefficients it lets through, up to sqrt(eps) beta each, are left out of T_j): below that
    // tolerance every step runs a full pass. And the omega recurrence models the rounding, it does not bound it:
    // when the estimates pass but the explicit check fails, the item is solved again with full passes.
    const bool partial =
        opt_.semi_orthogonality > 0 && opt_.tol >= kPartialFloor * opt_.semi_orthogonality * opt_.norm;
    if (run(item, want, start, rng, partial) == Verdict::fall_back) run(item, want, start, rng, false);
    // results: the lowest `want` of the verified pairs, ascending
    for (int c = 0; c < want; ++c) {
      values[c] = static_cast<T>(rho_[c]);
      residuals[c] = res_[c];
      for (int r = 0; r < n; ++r) vectors[static_cast<size_t>(r) * kw + c] = static_cast<T>(U_[static_cast<size_t>(c) * n + r]);
    }
    return products_;
  }

 private:
  enum class Verdict { converged, not_converged, lost_orthogonality, fall_back };
  static constexpr double kPartialFloor = 0.1;

  // Lanczos from the start vector until the pairs verify or the step budget is spent.
  Verdict run(const Item<T>& item, int want, const T* start, Random& rng, bool partial) {
    const int n = item.n;
    const int K = std::min(want + opt_.guards, n);
    const int max_steps = std::max(std::min(opt_.max_steps, n), K);  // never fewer steps than tracked pairs
    // V grows with the basis (an item that converges early never touches an n x n buffer)
    V_.assign(static_cast<size_t>(std::min(max_steps, 2 * K + 32)) * n, T(0));
    w_.assign(n, 0.0);
    alpha_.assign(max_steps, 0.0);
    beta_.assign(max_steps, 0.0);
    partial_ = partial;
    repeat_full_ = false;
    noise_ = opt_.eps * std::sqrt(static_cast<double>(n));
    omega_.assign(1, 1.0);
    omega_previous_.clear();

    // q_0: the warm start when it is not zero, else random
    double start_norm = 0;
    if (start != nullptr) start_norm = std::sqrt(dot(start, start, n));
    for (int i = 0; i < n; ++i) w_[i] = start_norm > 0 ? static_cast<double>(start[i]) : rng.uniform();
    store_unit(0, 0.0, rng);

    int j = 0;  // Lanczos steps taken: V[0..j) are the basis, V[j] the next vector (while j < max_steps)
    int next_check = std::min(max_steps, std::max(2 * K, K + 16));
    const int stride = std::max(8, K / 2);
    int previous_j = 0;
    double previous_estimate = 0;
    for (;;) {
      step(item, j, max_steps, rng);
      ++j;
      const bool last = j >= max_steps;
      if (j < next_check && !last) continue;
      const bool ok = ritz(j, K, j == n, last, rng);
      next_check = std::min(max_steps, j + next_gap(j, previous_j, previous_estimate, stride));
      previous_j = j;
      previous_estimate = top_estimate_;
      if (!ok && !last) continue;
      const Verdict verdict = verify(item, j, K, want);
      if (verdict == Verdict::converged) return verdict;
      if (partial && (ok || verdict == Verdict::lost_orthogonality)) return Verdict::fall_back;
      if (last) return verdict;
    }
  }

  // Writes w_ / |w_| (after removing V[0..j) twice) into V[j]; a w_ that is rounding noise becomes random.
  // Returns the norm of w_ before normalising (0 after a refill).
  double store_unit(int j, double scale, Random& rng) {
    const int n = static_cast<int>(w_.size());
    double norm = std::sqrt(dot(w_.data(), w_.data(), n));
    const double noise = 8.0 * std::sqrt(static_cast<double>(n)) * opt_.eps * std::max(scale, opt_.norm);
    double kept = norm;
    if (norm <= noise) {
      kept = 0.0;
      for (int attempt = 0; attempt < 8; ++attempt) {
        for (int i = 0; i < n; ++i) w_[i] = rng.uniform();
        const double before = std::sqrt(dot(w_.data(), w_.data(), n));
        orthogonalize(j);
        orthogonalize(j);
        norm = std::sqrt(dot(w_.data(), w_.data(), n));
        if (norm > 0.5 * before) break;
      }
    }
    T* q = V_.data() + static_cast<size_t>(j) * n;
    const double inv = norm > 0 ? 1.0 / norm : 0.0;
    for (int i = 0; i < n; ++i) q[i] = static_cast<T>(w_[i] * inv);
    return kept;
  }

  // w_ -= V[0..j)' (V[0..j) w_), classical Gram-Schmidt; returns the coefficient of V[j - 1].
  double orthogonalize(int j) {
    const int n = static_cast<int>(w_.size());
    coef_.resize(j);
    project(V_.data(), j, n, w_.data(), coef_.data());
    combine(V_.data(), j, n, coef_.data(), -1.0, w_.data());
    return j > 0 ? coef_[j - 1] : 0.0;
  }

  // One Lanczos step from V[j]: alpha_j, beta_j and V[j + 1] (when another step follows). The three-term
  // recurrence, then -- partial reorthogonalisation (Simon, 1984) -- a classical Gram-Schmidt pass against all of
  // V only when the estimated loss of orthogonality of the new vector exceeds the semi-orthogonality level, and
  // once more on the vector after (the one before it has lost as much). A pass is repeated when it removed more
  // than half of what was left ("twice is enough"); its coefficients correct alpha_j. Semi-orthogonality
  // (|q_i' q_k| <= sqrt(eps)) keeps T_j's eigenvalues those of L on span(V) to rounding; the Ritz vectors are made
  // orthonormal again in verify().
  void step(const Item<T>& item, int j, int max_steps, Random& rng) {
    const int n = item.n;
    const size_t rows_needed = static_cast<size_t>(std::min(j + 2, max_steps)) * n;
    if (V_.size() < rows_needed) V_.resize(std::min(std::max(rows_needed, 2 * V_.size()), static_cast<size_t>(max_steps) * n));
    const T* q = V_.data() + static_cast<size_t>(j) * n;
    item.apply(q, w_.data());
    ++products_;
    const double image = std::sqrt(dot(w_.data(), w_.data(), n));
    if (j > 0) axpy(-beta_[j - 1], V_.data() + static_cast<size_t>(j - 1) * n, w_.data(), n);
    double alpha = dot(q, w_.data(), n);
    axpy(-alpha, q, w_.data(), n);
    double norm = std::sqrt(dot(w_.data(), w_.data(), n));
    const bool repeat = repeat_full_;
    const bool full = !partial_ || repeat || !semi_orthogonal(j, alpha, norm);
    repeat_full_ = partial_ && full && !repeat;
    if (full) {
      for (int pass = 0; pass < 2; ++pass) {
        const double before = norm;
        alpha += orthogonalize(j + 1);
        norm = std::sqrt(dot(w_.data(), w_.data(), n));
        if (norm >= 0.5 * before) break;
        if (pass == 1) {  // what is left is rounding noise
          norm = 0.0;
          std::fill(w_.begin(), w_.end(), 0.0);
        }
      }
    }
    alpha_[j] = alpha;
    beta_[j] = norm;  // the coupling to the next vector, for the residual estimates
    if (j + 1 < max_steps) beta_[j] = store_unit(j + 1, image, rng);
    if (full || beta_[j] == 0.0) {  // orthogonal to rounding now (a refill is orthogonalised twice)
      omega_next_.assign(j + 2, noise_);
      omega_next_[j + 1] = 1.0;
    }
    omega_previous_.swap(omega_);
    omega_.swap(omega_next_);
  }

  // omega_next_[k] ~ q_{j+1}' q_k by Simon's recurrence from the two previous rows of these estimates (a model of
  // how rounding errors spread through the three-term recurrence, each new error given the sign that makes it
  // grow). True while every estimate stays within the semi-orthogonality level.
  //
  // The model can fall behind the truth: on 4096-node kNN blocks, k = 32, the overlap with the vectors that carry
  // the converged null vector grew 10-20x faster than its estimate, the basis drifted far past semi-orthogonality
  // (|q_{j+1}' q_9| = 0.2), one Gram-Schmidt pass could no longer restore it, T_j's Ritz values left the
  // spectrum (-2e8 for a Laplacian) and no check passed until the basis spanned the item (~4500 products instead
  // of ~400). So each step also measures the one overlap the model says is largest (a dot product of length n,
  // ~5% of a product by L) and, when the measurement is larger, scales the two rows the recurrence runs on up to
  // it: the model keeps its shape, anchored to the truth.
  bool semi_orthogonal(int j, double alpha, double beta) {
    omega_next_.assign(j + 2, 0.0);
    omega_next_[j + 1] = 1.0;
    if (!(beta > 0)) return false;
    double worst = 0;
    int largest = -1;
    for (int k = 0; k < j; ++k) {
      double t = beta_[k] * omega_[k + 1] + (alpha_[k] - alpha) * omega_[k] - beta_[j - 1] * omega_previous_[k];
      if (k > 0) t += beta_[k - 1] * omega_[k - 1];
      t += std::copysign(noise_ * (beta_[k] + beta), t);
      omega_next_[k] = t / beta;
      if (std::fabs(omega_next_[k]) > worst) {
        worst = std::fabs(omega_next_[k]);
        largest = k;
      }
    }
    if (largest >= 0) {
      const int n = static_cast<int>(w_.size());
      const double measured = std::fabs(dot(V_.data() + static_cast<size_t>(largest) * n, w_.data(), n)) / beta;
      if (measured > worst) {
        const double gain = measured / worst;
        for (int k = 0; k < j; ++k) omega_next_[k] *= gain;
        for (int k = 0; k + 1 < j; ++k) omega_[k] *= gain;   // omega_[j] = 1 (q_j' q_j), omega_[j - 1]: local
        worst = measured;
      }
    }
    omega_next_[j] = noise_ * opt_.norm / beta;  // against q_j: what the local subtraction of alpha left
    worst = std::max(worst, omega_next_[j]);
    return worst <= opt_.semi_orthogonality;
  }

  // Rayleigh-Ritz on T_j: the K lowest eigenvalues theta_, their eigenvectors S_ (K x j) and residual estimates.
  // True when every estimate meets the tolerance (or the Krylov space is the whole item). Unless `last` (the step
  // budget is spent: the pairs are needed whatever their state), a failing check may return before S_ is filled.
  bool ritz(int j, int K, bool exhausted, bool last, Random& rng) {
    const int count = std::min(K, j);
    top_estimate_ = std::numeric_limits<double>::infinity();
    if (count < K && !exhausted && !last) return false;
    std::vector<double>& x = work_;
    x.resize(j);
    if (!exhausted && !last) {
      // first the top tracked pair alone (Lanczos converges from the ends inwards, so it is usually the last to
      // converge): a failing checkpoint costs one bisection and one inverse iteration, not the whole spectrum
      // (to 1e-10 of the scale: enough for two steps of inverse iteration to find its vector)
      tridiagonal_eigenvalues(alpha_.data(), beta_.data(), j, K - 1, 1, 1e-10, theta_, d_, e_);
      top_estimate_ = estimate(theta_[0], j, x, rng);
      if (!(top_estimate_ <= 0.5 * opt_.tol)) return false;
    }
    tridiagonal_eigenvalues(alpha_.data(), beta_.data(), j, 0, count, 1e-10, theta_, d_, e_);
    const double scale = tridiagonal_scale(alpha_.data(), beta_.data(), j);
    const double tiny = pivot_floor(scale);
    const double cluster = 1e-3 * scale;
    S_.assign(static_cast<size_t>(count) * j, 0.0);
    bool all = true;
    int cluster_start = 0;
    for (int i = 0; i < count; ++i) {
      if (i > 0 && theta_[i] - theta_[i - 1] > cluster) cluster_start = i;
      double* s = S_.data() + static_cast<size_t>(i) * j;
      // shifts of equal eigenvalues are separated slightly so that their solves differ (as LAPACK's dstein)
      const double shift = theta_[i] + (i - cluster_start) * 10.0 * tiny;
      for (int t = 0; t < j; ++t) x[t] = rng.uniform();
      lu_.factor(alpha_.data(), beta_.data(), j, shift, tiny);
      // two sweeps, each leaving x a unit vector orthogonal to the cluster's earlier vectors (a sweep that
      // breaks down restarts from a random vector made so)
      for (int sweep = 0; sweep < 2; ++sweep) {
        lu_.solve(x.data());
        for (int attempt = 0; attempt < 8; ++attempt) {
          for (int p = cluster_start; p < i; ++p) {
            const double* sp = S_.data() + static_cast<size_t>(p) * j;
            const double c = dot(sp, x.data(), j);
            for (int t = 0; t < j; ++t) x[t] -= c * sp[t];
          }
          if (make_unit(x.data(), j)) break;
          for (int t = 0; t < j; ++t) x[t] = rng.uniform();
        }
      }
      std::copy(x.begin(), x.end(), s);
      const double estimate = exhausted ? 0.0 : std::fabs(beta_[j - 1] * s[j - 1]);
      if (estimate > 0.5 * opt_.tol) all = false;
    }
    return all;
  }

  // Steps to the next checkpoint. The top pair's residual estimate falls about geometrically in the step count
  // (faster as it converges), so extrapolating its rate from the last two checks to half the tolerance
  // overshoots the step that meets it by little; without two estimates, half a stride.
  int next_gap(int j, int previous_j, double previous_estimate, int stride) const {
    const double target = 0.5 * opt_.tol;
    const double now = top_estimate_;
    if (previous_j > 0 && previous_estimate > now && now > target && std::isfinite(previous_estimate)) {
      const double rate = std::log(previous_estimate / now) / (j - previous_j);
      const double steps = std::ceil(std::log(now / target) / rate);
      return static_cast<int>(std::clamp(steps, 2.0, 2.0 * stride));
    }
    return std::max(2, stride / 2);
  }

  // Residual estimate beta_{j-1} |s[j-1]| of the Ritz pair of T_j at `value` (inverse iteration; x: scratch).
  double estimate(double value, int j, std::vector<double>& x, Random& rng) {
    const double tiny = pivot_floor(tridiagonal_scale(alpha_.data(), beta_.data(), j));
    for (int t = 0; t < j; ++t) x[t] = rng.uniform();
    lu_.factor(alpha_.data(), beta_.data(), j, value, tiny);
    for (int sweep = 0; sweep < 2; ++sweep) {
      lu_.solve(x.data());
      if (!make_unit(x.data(), j)) return std::numeric_limits<double>::infinity();
    }
    return std::fabs(beta_[j - 1] * x[j - 1]);
  }

  // Ritz vectors Y = S V (one pass over V), a fresh product L y for each, then Rayleigh-Ritz on span(Y): with
  // G = Y Y' = R R' and H = Y (L Y)', the eigenpairs (theta, z) of R^-1 H R^-T give U = W' Y and L U = W' (L Y)
  // with W = R^-T Z. U is orthonormal to rounding even though V was only semi-orthogonal, and the explicit
  // residuals |L u - theta u| are the verdict: converged when every wanted pair meets the tolerance.
  // lost_orthogonality: the rows of Y were far from independent (G's Cholesky), which semi-orthogonality rules out.
  Verdict verify(const Item<T>& item, int j, int K, int want) {
    const int n = item.n;
    const int m = std::min(K, j);
    Y_.resize(static_cast<size_t>(m) * n);
    LY_.resize(static_cast<size_t>(m) * n);
    combine_rows(V_.data(), j, n, S_.data(), m, Y_.data());
    for (double& y : Y_) y = static_cast<double>(static_cast<T>(y));  // the vectors returned, in their dtype
    item.apply_rows(Y_.data(), m, LY_.data(), scratch_, scratch2_);
    products_ += m;
    G_.resize(static_cast<size_t>(m) * m);
    H_.resize(static_cast<size_t>(m) * m);
    for (int i = 0; i < m; ++i) {
      const double* y = Y_.data() + static_cast<size_t>(i) * n;
      project(Y_.data(), m, n, y, G_.data() + static_cast<size_t>(i) * m);
      project(LY_.data(), m, n, y, H_.data() + static_cast<size_t>(i) * m);
    }
    symmetrize(H_.data(), m);
    if (cholesky(G_.data(), m) < 0.5) {  // no usable pairs: nothing of an earlier item may be left to return
      rho_.assign(m, 0.0);
      res_.assign(m, std::numeric_limits<double>::infinity());
      U_.assign(static_cast<size_t>(m) * n, 0.0);
      return Verdict::lost_orthogonality;
    }
    lower_solve(G_.data(), m, H_.data());  // R^-1 H
    transpose(H_.data(), m);               // H R^-T (H symmetric)
    lower_solve(G_.data(), m, H_.data());  // R^-1 H R^-T
    symmetrize(H_.data(), m);
    symmetric_eigen(H_.data(), m, rho_, Z_);
    lower_transposed_solve(G_.data(), m, Z_.data());  // W = R^-T Z
    transpose(Z_.data(), m);                          // row o: the coefficients of u_o
    U_.resize(static_cast<size_t>(m) * n);
    combine_rows(Y_.data(), m, n, Z_.data(), m, U_.data());
    LU_.resize(static_cast<size_t>(m) * n);
    combine_rows(LY_.data(), m, n, Z_.data(), m, LU_.data());
    res_.assign(m, 0.0);
    for (int i = 0; i < m; ++i) {
      const double* u = U_.data() + static_cast<size_t>(i) * n;
      const double* lu = LU_.data() + static_cast<size_t>(i) * n;
      double r2 = 0;
      for (int r = 0; r < n; ++r) {
        const double t = lu[r] - rho_[i] * u[r];
        r2 += t * t;
      }
      res_[i] = std::sqrt(r2);
    }
    for (int i = 0; i < std::min(want, m); ++i)
      if (!(res_[i] <= opt_.tol)) return Verdict::not_converged;
    return Verdict::converged;
  }

  Options opt_;
  std::vector<T> V_;
  std::vector<double> w_, coef_, alpha_, beta_, d_, e_, theta_, S_, work_, Y_, LY_, G_, H_, Z_, U_, LU_, rho_, res_;
  std::vector<double> scratch_, scratch2_;
  std::vector<double> omega_, omega_previous_, omega_next_;  // rows j, j - 1 and j + 1 of the estimates q_j' q_k
  ShiftedTridiagonal lu_;
  int64_t products_ = 0;
  double top_estimate_ = 0;  // the last cheap check's residual estimate of the top tracked pair
  double noise_ = 0;         // eps sqrt(n): the size of one rounding error in an inner product of unit vectors
  bool partial_ = true;      // partial reorthogonalisation (false: a full pass every step)
  bool repeat_full_ = false; // the last step ran a full pass that the estimates asked for: the next one runs one too
};

template <typename T>
void solve_all(int64_t first_item, int64_t num_items, int64_t n_pad, const int64_t* sizes, const int64_t* node_map,
               const Graph<T>& graph, const int64_t* want, int64_t kw, const T* start, const Options& options,
               uint64_t seed, int threads, T* values, T* vectors, double* residuals, int64_t* products) {
  std::atomic<int64_t> next{first_item};
  const int64_t end = first_item + num_items;
  std::mutex error_lock;
  std::string error;
  auto worker = [&]() {
    Solver<T> solver(options);
    Item<T> item;
    for (;;) {
      const int64_t g = next.fetch_add(1);
      if (g >= end) return;
      try {
        if (sizes[g] == 0 || want[g] == 0) continue;
        if (sizes[g] > n_pad || want[g] > sizes[g] || want[g] > kw)
          throw std::invalid_argument("bad sizes: want " + std::to_string(want[g]) + ", size " +
                                      std::to_string(sizes[g]) + ", n_pad " + std::to_string(n_pad) + ", kw " +
                                      std::to_string(kw));
        item.load(graph, node_map + g * n_pad, static_cast<int>(sizes[g]), g);
        const T* item_start = start != nullptr ? start + g * n_pad : nullptr;
        products[g] = solver.solve(item, static_cast<int>(want[g]), static_cast<int>(kw), item_start,
                                   seed ^ (0xD1B54A32D192ED03ull * static_cast<uint64_t>(g + 1)), values + g * kw,
                                   vectors + g * n_pad * kw, residuals + g * kw);
      } catch (const std::exception& exc) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (error.empty()) error = "item " + std::to_string(g) + ": " + exc.what();
        next.store(end);
      }
    }
  };
  {
    const int count = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, num_items)));
    std::vector<std::thread> pool;
    for (int t = 1; t < count; ++t) pool.emplace_back(worker);
    worker();
    for (auto& thread : pool) thread.join();
  }
  if (!error.empty()) throw std::runtime_error(error);
}

