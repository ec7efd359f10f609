// memory_update_ on CPU: one update of the prototype memory for the U classes of a step.
// Phases (the CUDA twin runs the same ones as kernels):
//   resolve: look each class up; build the refreshed prototype normalize(a*P[old] + (1-a)*p)
//   place:   choose each written class's slot in the window at the ring head, evicting occupants
//   commit:  write prototypes, slot labels, stamps and index entries (or rebuild the index when
//            the step's inserts could take live + deleted entries past 3/4 of the table);
//            advance head and step
// Class id -1 is padding (generate_prototypes(padded=True)): skipped and not counted.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "hash_index_cpu.h"

namespace protomem {
namespace {

constexpr float kEps = 1e-12f;

template <typename scalar_t>
void resolve(const scalar_t* P, const float* p, const int64_t* classes, const HashIndexCPU& index,
             int64_t U, int64_t D, float momentum, std::vector<uint8_t>& valid,
             std::vector<int64_t>& pos, std::vector<int64_t>& old, std::vector<float>& fresh) {
  at::parallel_for(0, U, 8, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c = classes[u];
      pos[u] = c >= 0 ? index.find(c) : -1;
      old[u] = pos[u] >= 0 ? index.vals[pos[u]] : -1;
      const float* pu = p + u * D;
      bool finite = c >= 0;
      for (int64_t d = 0; d < D && finite; ++d) finite = std::isfinite(pu[d]);
      valid[u] = finite;
      if (!finite) continue;
      const float a = old[u] >= 0 ? momentum : 0.f;
      float* f = fresh.data() + u * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float prev = old[u] >= 0 ? static_cast<float>(P[old[u] * D + d]) : 0.f;
        f[d] = a * prev + (1.f - a) * pu[d];
        ss += f[d] * f[d];
      }
      const float inv = 1.f / std::max(std::sqrt(ss), kEps);
      for (int64_t d = 0; d < D; ++d) f[d] *= inv;
    }
  });
}

// The op's output [3, U]: slot after the update, slot before it (-1 if absent), and that slot's
// stamp before the update (-1 if absent).
at::Tensor unchanged_output(const int64_t* cls, const int64_t* S, const HashIndexCPU& index,
                            int64_t U, const at::TensorOptions& options) {
  auto out = at::empty({3, U}, options);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) {
    const int64_t at = cls[u] >= 0 ? index.find(cls[u]) : -1;
    o[u] = o[U + u] = at >= 0 ? index.vals[at] : -1;
    o[2 * U + u] = o[u] >= 0 ? S[o[u]] : -1;
  }
  return out;
}

at::Tensor memory_update_cpu(at::Tensor protos, at::Tensor slot_labels, at::Tensor stamps,
                             at::Tensor index_keys, at::Tensor index_vals, at::Tensor counters,
                             const at::Tensor& classes_in, const at::Tensor& new_protos,
                             double momentum, c10::string_view policy,
                             const c10::optional<at::Tensor>& commit,
                             const c10::optional<at::Tensor>& /*workspace: CUDA scratch*/) {
  check_memory_update_args(protos, slot_labels, stamps, index_keys, index_vals, counters,
                           classes_in, new_protos, momentum, policy);
  check_commit(commit, protos);
  if (debug_checks_enabled()) check_distinct_classes(classes_in);
  const int64_t M = protos.size(0), D = protos.size(1), U = classes_in.size(0);
  const bool lru = policy == "lru";
  auto classes = classes_in.contiguous();
  const int64_t* cls = classes.data_ptr<int64_t>();
  int64_t* L = slot_labels.data_ptr<int64_t>();
  int64_t* S = stamps.data_ptr<int64_t>();
  int64_t* C = counters.data_ptr<int64_t>();
  HashIndexCPU index{index_keys.data_ptr<int64_t>(), index_vals.data_ptr<int64_t>(),
                     index_keys.size(0)};
  if (commit.has_value() && !commit->item<bool>()) {
    return unchanged_output(cls, S, index, U, classes.options());
  }
  auto p = new_protos.to(at::kFloat).contiguous();

  std::vector<uint8_t> valid(U);
  std::vector<int64_t> pos(U), old(U), slot(U, -1);
  std::vector<float> fresh(U * D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "memory_resolve", [&] {
    resolve<scalar_t>(protos.data_ptr<scalar_t>(), p.data_ptr<float>(), cls, index, U, D,
                      static_cast<float>(momentum), valid, pos, old, fresh);
  });
  auto out = at::empty({3, U}, classes.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) {
    o[U + u] = old[u];
    o[2 * U + u] = old[u] >= 0 ? S[old[u]] : -1;
  }

  // place: LRU writes every valid class into the window (freeing a hit's old slot first);
  // FIFO refreshes hits in place and gives misses the window slots its hits do not hold.
  const int64_t head = ring_head(C[kHead], M);
  std::vector<int64_t> placed;
  std::vector<uint8_t> held(U, 0);
  int64_t hits = 0, n_valid = 0, inserts = 0, padding = 0;
  for (int64_t u = 0; u < U; ++u) {
    padding += cls[u] == kEmptyKey;
    if (!valid[u]) continue;
    ++n_valid;
    const bool hit = old[u] >= 0;
    hits += hit;
    inserts += pos[u] < 0;
    if (hit && !lru) {
      slot[u] = old[u];
      const int64_t r = (old[u] - head + M) % M;
      if (r < U) held[r] = 1;
    } else {
      if (hit) L[old[u]] = -1;
      placed.push_back(u);
    }
  }
  int64_t next = 0, last_r = -1;
  for (int64_t r = 0; r < U && next < static_cast<int64_t>(placed.size()); ++r) {
    if (held[r]) continue;
    const int64_t s = (head + r) % M;
    slot[placed[next++]] = s;
    last_r = r;
    if (L[s] >= 0) {  // evict the occupant
      const int64_t at = index.find(L[s]);
      if (at >= 0) index.keys[at] = kTombKey;
      L[s] = -1;
      ++C[kEvictions];
      ++C[kTombstones];
    }
  }
  const bool rebuild = index_rebuild_due(C[kTombstones], inserts, index.capacity);

  // commit
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "memory_commit", [&] {
    scalar_t* P = protos.data_ptr<scalar_t>();
    at::parallel_for(0, U, 8, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        if (!valid[u]) continue;
        for (int64_t d = 0; d < D; ++d) P[slot[u] * D + d] = static_cast<scalar_t>(fresh[u * D + d]);
      }
    });
  });
  const int64_t step = C[kStep];
  for (int64_t u = 0; u < U; ++u) {
    if (!valid[u]) continue;
    L[slot[u]] = cls[u];
    S[slot[u]] = step;
    if (rebuild) continue;
    if (pos[u] >= 0) {
      index.vals[pos[u]] = slot[u];
    } else {
      const InsertResult r = index.insert(cls[u], slot[u]);
      C[kTombstones] -= r == kInsertedTomb;
      C[kLostInserts] += r == kInsertFailed;
    }
  }
  if (rebuild) {
    C[kLostInserts] += index.rebuild(L, M);
    C[kTombstones] = 0;
    ++C[kRebuilds];
  }
  if (last_r >= 0) C[kHead] = (head + last_r + 1) % M;
  C[kStep] = step + 1;
  C[kHits] += hits;
  C[kMisses] += n_valid - hits;
  C[kRejected] += U - n_valid - padding;

  // A rejected class keeps its old slot unless this step evicted it.
  for (int64_t u = 0; u < U; ++u) {
    o[u] = valid[u] ? slot[u] : (old[u] >= 0 && L[old[u]] == cls[u] ? old[u] : -1);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CPU, m) { m.impl("memory_update_", &memory_update_cpu); }

}  // namespace protomem
