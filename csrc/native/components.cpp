// Connected components of a sparse matrix's pattern (an entry (i, j) links i and j whatever its direction or value):
// union-find with path halving and union by size. Replaces scipy's connected_components in the eigensolver's plan,
// which converts the pattern to CSC and adds its transpose first (40 ms for 131072 nodes, 2.8M entries).
#include "native.h"

#include <numeric>
#include <utility>
#include <vector>

namespace spectralkern_native {

void connected_components(int64_t n, const int64_t* crow, const int64_t* col, int64_t* labels) {
  std::vector<int64_t> parent(static_cast<size_t>(n)), size(static_cast<size_t>(n), 1);
  std::iota(parent.begin(), parent.end(), int64_t{0});
  auto find = [&](int64_t v) {
    while (parent[v] != v) {
      parent[v] = parent[parent[v]];
      v = parent[v];
    }
    return v;
  };
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t t = crow[r]; t < crow[r + 1]; ++t) {
      int64_t a = find(r), b = find(col[t]);
      if (a == b) continue;
      if (size[a] < size[b]) std::swap(a, b);
      parent[b] = a;
      size[a] += size[b];
    }
  }
  // labels 0, 1, ... in order of each component's first node
  std::vector<int64_t> label_of_root(static_cast<size_t>(n), -1);
  int64_t next = 0;
  for (int64_t v = 0; v < n; ++v) {
    const int64_t root = find(v);
    if (label_of_root[root] < 0) label_of_root[root] = next++;
    labels[v] = label_of_root[root];
  }
}

}  // namespace spectralkern_native
