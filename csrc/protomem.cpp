// The protomem._C extension: build information for Python, and every op schema, declared once.
// Implementations register per device in csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef PROTOMEM_VERSION
#define PROTOMEM_VERSION "unknown"
#endif
#ifndef PROTOMEM_CUDA_ARCH_LIST
#define PROTOMEM_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = PROTOMEM_VERSION;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_arch_list"] = PROTOMEM_CUDA_ARCH_LIST;
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_arch_list"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;  // at::parallel_for in the C++ kernels runs on ATen's threads
#else
  info["openmp"] = false;  // ... on the calling thread only
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "protomem compiled kernels; the ops live in torch.ops.protomem";
  m.def("build_info", &build_info,
        "dict: version, torch_version (built against), with_cuda, cuda_version, cuda_arch_list, "
        "openmp");
}

TORCH_LIBRARY(protomem, m) {
  // x [B, D] float, labels [B] int64, weights [B] float? ->
  //   classes [U] int64 sorted unique, protos [U, D] float32 (float64 for float64 x), inverse [B];
  //   padded: U = B, the classes first and then -1 with zero prototypes (no host sync, no checks)
  m.def("generate_prototypes(Tensor x, Tensor labels, Tensor? weights=None, bool padded=False)"
        " -> (Tensor classes, Tensor protos, Tensor inverse)");
  // Updates the memory with the U classes of a step (class -1: padding). Returns [3, U] int64:
  // each class's slot after the update, its slot before it, and that slot's stamp before it (-1
  // where absent). commit: a bool on the device, the update is applied only where true;
  // workspace: int64 scratch of the CUDA kernels, reused across calls (unused on CPU).
  m.def("memory_update_(Tensor(a!) protos, Tensor(b!) slot_labels, Tensor(c!) stamps,"
        " Tensor(d!) index_keys, Tensor(e!) index_vals, Tensor(f!) counters, Tensor classes,"
        " Tensor new_protos, float momentum, str policy, Tensor? commit=None,"
        " Tensor(g!)? workspace=None) -> Tensor");
  // labels (any shape) int64 -> slots (same shape) int64, -1 where absent.
  m.def("lookup(Tensor index_keys, Tensor index_vals, Tensor labels) -> Tensor");
  // Rebuilds the index from slot_labels (after a load, or to clear tombstones).
  m.def("rebuild_index_(Tensor(a!) index_keys, Tensor(b!) index_vals, Tensor slot_labels) -> ()");
  // The softmax of s*cos(x_i, W_j) over each row's *other* columns (label >= 0 and != the row's
  // label), kept as per-row values (protomem/reference.py::cos_lse_fwd_ref): lse [B], best [B]
  // (highest other cosine), best_index [B] int64 (its smallest column, -1 if none), direction
  // [B, D] (softmax-weighted sum of the normalised columns: grad x of lse is O(B D) from it) and
  // w_inv_norm [M] (1/|W_j|, or ones), computed once and reused by the backward. precision:
  // "default" (tensor cores with fp32 accumulation on CUDA) or "highest" (fp32 operands).
  m.def("cos_lse_fwd(Tensor x, Tensor W, Tensor row_labels, Tensor col_labels, float scale,"
        " bool normalize_x, bool normalize_w, str precision)"
        " -> (Tensor lse, Tensor best, Tensor best_index, Tensor direction, Tensor w_inv_norm)");
  // d(sum_i grad_lse_i * lse_i) / dW [M, D] (W's dtype), the tangent projection applied per column.
  m.def("cos_lse_bwd_w(Tensor grad_lse, Tensor x, Tensor W, Tensor row_labels, Tensor col_labels,"
        " Tensor lse, Tensor w_inv_norm, float scale, bool normalize_x, bool normalize_w,"
        " str precision) -> Tensor grad_W");
  // Writes keys [N, D] and labels [N] into the ring at its head, overwriting the oldest.
  // done: int64 [1] zero on the device, the CUDA kernel's count of finished rows (left at zero),
  // so that the last row advances the ring in the same kernel (unused on CPU).
  m.def("queue_enqueue_(Tensor(a!) queue, Tensor(b!) queue_labels, Tensor(c!) counters,"
        " Tensor keys, Tensor labels, Tensor(d!)? done=None) -> ()");
  // The doppelganger lists' update (host memory, CPU only): others [C, k] int32 (-1 empty) and
  // scores [C, k] float16, best first, from pairs (rows [n] int64, other_classes [n] int64, cos
  // [n] float32); the rule of protomem/reference.py::lookalike_update_ref.
  m.def("lookalike_update_(Tensor(a!) others, Tensor(b!) scores, Tensor rows, Tensor other_classes,"
        " Tensor cos, float decay, bool symmetric) -> ()");
}
