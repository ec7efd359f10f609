// Argument validation shared by the CPU and CUDA implementations of every op. Errors surface in
// Python as TypeError (wrong dtype) or ValueError (wrong shape, size, device or value), and are
// raised before any state is touched.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "memory_layout.h"

namespace protomem {

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", c10::toString(want), ", got ",
                   t.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_storage_dtype(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", s);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimension(s), got shape ",
                    t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t d, int64_t want, const char* name,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == want, name, ".size(", d, ") must equal ", what, " (", want,
                    "), got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; move them to one device");
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (it is state written in place)");
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// index_keys / index_vals: int64 [T], T a power of two >= 2 * M.
inline void check_index(const at::Tensor& index_keys, const at::Tensor& index_vals, int64_t M) {
  check_dim(index_keys, 1, "index_keys");
  check_dtype(index_keys, at::kLong, "index_keys");
  check_dim(index_vals, 1, "index_vals");
  check_dtype(index_vals, at::kLong, "index_vals");
  const int64_t T = index_keys.size(0);
  TORCH_CHECK_VALUE(is_pow2(T), "index_keys must have a power-of-two length, got ", T);
  TORCH_CHECK_VALUE(M < 0 || T >= 2 * M, "index_keys must have length >= 2 * memory size (",
                    2 * M, "), got ", T);
  check_size(index_vals, 0, T, "index_vals", "len(index_keys)");
  check_same_device(index_vals, index_keys, "index_vals", "index_keys");
  check_contiguous(index_keys, "index_keys");
  check_contiguous(index_vals, "index_vals");
}

// The state tensors of a PrototypeMemory: protos [M, D], slot_labels [M], stamps [M],
// index_keys [T], index_vals [T] (T a power of two >= 2M), counters [kNumMemoryCounters].
inline void check_memory_state(const at::Tensor& protos, const at::Tensor& slot_labels,
                               const at::Tensor& stamps, const at::Tensor& index_keys,
                               const at::Tensor& index_vals, const at::Tensor& counters) {
  check_dim(protos, 2, "protos");
  check_storage_dtype(protos, "protos");
  const int64_t M = protos.size(0);
  TORCH_CHECK_VALUE(M > 0 && protos.size(1) > 0, "protos must be non-empty, got shape ",
                    protos.sizes());
  check_dim(slot_labels, 1, "slot_labels");
  check_dtype(slot_labels, at::kLong, "slot_labels");
  check_size(slot_labels, 0, M, "slot_labels", "memory size M");
  check_dim(stamps, 1, "stamps");
  check_dtype(stamps, at::kLong, "stamps");
  check_size(stamps, 0, M, "stamps", "memory size M");
  check_index(index_keys, index_vals, M);
  check_dim(counters, 1, "counters");
  check_dtype(counters, at::kLong, "counters");
  check_size(counters, 0, kNumMemoryCounters, "counters", "the number of memory counters");
  for (const auto* t : {&slot_labels, &stamps, &index_keys, &index_vals, &counters}) {
    check_same_device(*t, protos, "memory state", "protos");
  }
  check_contiguous(protos, "protos");
  check_contiguous(slot_labels, "slot_labels");
  check_contiguous(stamps, "stamps");
  check_contiguous(counters, "counters");
}

inline void check_labels(const at::Tensor& labels, const char* name) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, name,
                   " must be int64 class ids, got ", labels.scalar_type());
}

inline void check_policy(c10::string_view policy) {
  TORCH_CHECK_VALUE(policy == "lru" || policy == "fifo", "policy must be 'lru' or 'fifo', got '",
                    std::string(policy), "'");
}

}  // namespace protomem

namespace protomem {

inline void check_memory_update_args(const at::Tensor& protos, const at::Tensor& slot_labels,
                                     const at::Tensor& stamps, const at::Tensor& index_keys,
                                     const at::Tensor& index_vals, const at::Tensor& counters,
                                     const at::Tensor& classes, const at::Tensor& new_protos,
                                     double momentum, c10::string_view policy) {
  check_memory_state(protos, slot_labels, stamps, index_keys, index_vals, counters);
  check_dim(classes, 1, "classes");
  check_labels(classes, "classes");
  check_dim(new_protos, 2, "new_protos");
  check_float_dtype(new_protos, "new_protos");
  const int64_t M = protos.size(0), U = classes.size(0);
  check_size(new_protos, 0, U, "new_protos", "len(classes)");
  check_size(new_protos, 1, protos.size(1), "new_protos", "the memory's embedding size");
  TORCH_CHECK_VALUE(U <= M, "one update holds ", U, " distinct classes but the memory has only ",
                    M, " slots; use a larger memory_size or a smaller batch");
  check_same_device(classes, protos, "classes", "protos");
  check_same_device(new_protos, protos, "new_protos", "protos");
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "momentum must be in [0, 1], got ",
                    momentum);
  check_policy(policy);
}

// The optional commit switch of memory_update_: a one-element bool tensor on the memory's device.
inline void check_commit(const c10::optional<at::Tensor>& commit, const at::Tensor& protos) {
  if (!commit.has_value()) return;
  check_dtype(*commit, at::kBool, "commit");
  TORCH_CHECK_VALUE(commit->numel() == 1, "commit must hold one element, got shape ",
                    commit->sizes());
  check_same_device(*commit, protos, "commit", "protos");
}

// PROTOMEM_DEBUG=1 turns on the checks that cost a host sync on CUDA.
inline bool debug_checks_enabled() {
  const char* v = std::getenv("PROTOMEM_DEBUG");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

// Two equal class ids >= 0 in one update would race on CUDA (two warps writing one row, two index
// entries for one key); the op does not check this unless debugging (the check syncs on CUDA).
inline void check_distinct_classes(const at::Tensor& classes) {
  if (classes.numel() < 2) return;
  auto sorted = std::get<0>(at::sort(classes));
  auto next = sorted.narrow(0, 1, sorted.numel() - 1);
  auto repeated = next.eq(sorted.narrow(0, 0, sorted.numel() - 1)).logical_and_(next.ge(0));
  TORCH_CHECK_VALUE(!repeated.any().item<bool>(),
                    "classes must be distinct (PROTOMEM_DEBUG check): a class id >= 0 appears twice");
}

// ClassQueue state: queue [K, D], queue_labels [K], counters [kNumQueueCounters]; and the rows
// to enqueue: keys [N, D], labels [N].
inline void check_queue_args(const at::Tensor& queue, const at::Tensor& queue_labels,
                             const at::Tensor& counters, const at::Tensor& keys,
                             const at::Tensor& labels) {
  check_dim(queue, 2, "queue");
  check_storage_dtype(queue, "queue");
  TORCH_CHECK_VALUE(queue.size(0) > 0 && queue.size(1) > 0, "queue must be non-empty, got shape ",
                    queue.sizes());
  check_dim(queue_labels, 1, "queue_labels");
  check_dtype(queue_labels, at::kLong, "queue_labels");
  check_size(queue_labels, 0, queue.size(0), "queue_labels", "queue size K");
  check_dim(counters, 1, "counters");
  check_dtype(counters, at::kLong, "counters");
  check_size(counters, 0, kNumQueueCounters, "counters", "the number of queue counters");
  check_dim(keys, 2, "keys");
  check_float_dtype(keys, "keys");
  check_size(keys, 1, queue.size(1), "keys", "the queue's embedding size");
  check_dim(labels, 1, "labels");
  check_labels(labels, "labels");
  check_size(labels, 0, keys.size(0), "labels", "keys.size(0)");
  for (const auto* t : {&queue_labels, &counters, &keys, &labels}) {
    check_same_device(*t, queue, "queue inputs", "queue");
  }
  check_contiguous(queue, "queue");
  check_contiguous(queue_labels, "queue_labels");
  check_contiguous(counters, "counters");
}

}  // namespace protomem
