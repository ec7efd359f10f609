// cos_lse tile kernels for the build's baseline CPU, and the per-call choice between them and the
// AVX2 ones (cos_lse_tiles_avx2.cpp).
#define CPU_CAPABILITY DEFAULT
#include "cos_lse_tiles_impl.h"

#include <cstdlib>
#include <cstring>

namespace protomem {
namespace cos_lse {

namespace DEFAULT {
template <typename T>
const Kernels<T>& kernels() {
  return table<T>();
}
template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();
}  // namespace DEFAULT

namespace {
bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}
}  // namespace

template <typename T>
const Kernels<T>& kernels() {
  const char* force = std::getenv("PROTOMEM_CPU_VEC");  // "default": the baseline (tests)
  const bool baseline = force != nullptr && std::strcmp(force, "default") == 0;
  const Kernels<T>* avx2 = AVX2::kernels<T>();
  return !baseline && avx2 != nullptr && cpu_has_avx2() ? *avx2 : DEFAULT::kernels<T>();
}
template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();

}  // namespace cos_lse
}  // namespace protomem
