// The entries that cos_lse leaves out per row besides empty columns: the columns carrying the row's
// own label. They are few (a row's class has a handful of columns at most), so they are found once
// per call and written as -inf into each block of dot products before its fused pass.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace protomem {
namespace cos_lse {

class SameLabel {
 public:
  // rows [B], cols [M]: int64 labels (a column label < 0 is empty and matches nothing).
  SameLabel(const int64_t* rows, int64_t B, const int64_t* cols, int64_t M)
      : begin_(B, 0), end_(B, 0) {
    int bits = 1;
    while ((int64_t{1} << bits) < 2 * B) ++bits;
    const uint64_t mask = (uint64_t{1} << bits) - 1;
    std::vector<int64_t> keys(mask + 1, -1), group_of_row(B, -1);
    std::vector<int64_t> group_at(mask + 1, -1);
    int64_t groups = 0;
    auto slot = [&](int64_t label) {
      uint64_t h = (static_cast<uint64_t>(label) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
      while (keys[h] != -1 && keys[h] != label) h = (h + 1) & mask;
      return h;
    };
    for (int64_t i = 0; i < B; ++i) {
      if (rows[i] < 0) continue;
      const uint64_t h = slot(rows[i]);
      if (keys[h] == -1) {
        keys[h] = rows[i];
        group_at[h] = groups++;
      }
      group_of_row[i] = group_at[h];
    }
    // (group, column) of every hit, then a counting sort by group (columns stay ascending).
    std::vector<int64_t> hit_group, hit_col, count(groups + 1, 0);
    for (int64_t j = 0; j < M && groups > 0; ++j) {
      if (cols[j] < 0) continue;
      const uint64_t h = slot(cols[j]);
      if (keys[h] == -1) continue;
      hit_group.push_back(group_at[h]);
      hit_col.push_back(j);
      ++count[group_at[h] + 1];
    }
    for (int64_t g = 0; g < groups; ++g) count[g + 1] += count[g];
    cols_.resize(hit_col.size());
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (size_t e = 0; e < hit_col.size(); ++e) cols_[fill[hit_group[e]]++] = hit_col[e];
    for (int64_t i = 0; i < B; ++i) {
      if (group_of_row[i] < 0) continue;
      begin_[i] = count[group_of_row[i]];
      end_[i] = count[group_of_row[i] + 1];
    }
  }

  // Writes -inf at row i's same-label columns in [j0, j1) of v [j1 - j0, ld] (column j is row
  // j - j0 of v).
  template <typename T>
  void mask_block(T* v, int64_t ld, int64_t j0, int64_t j1, int64_t i) const {
    const auto end = cols_.begin() + end_[i];
    for (auto it = std::lower_bound(cols_.begin() + begin_[i], end, j0); it != end && *it < j1; ++it) {
      v[(*it - j0) * ld + i] = -std::numeric_limits<T>::infinity();
    }
  }

 private:
  std::vector<int64_t> cols_, begin_, end_;  // per row: its range [begin, end) in cols_
};

}  // namespace cos_lse
}  // namespace protomem
