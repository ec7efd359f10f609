// cos_lse tile kernels compiled for AVX2 + FMA whatever the build's flags (used only when the
// running CPU has both, see cos_lse_tiles_default.cpp). The build passes no -mavx2, so this file
// switches the target itself; everything that is not ATen's vector code (namespaced per
// capability, at::vec::AVX2) is included first, so that no inline function shared with other
// files is compiled here with AVX2 instructions.
#include "cos_lse_tiles.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <ATen/ATen.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"
// The target pragma does not define these in C++; ATen's headers and sleef.h test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cos_lse_tiles_impl.h"
#define PROTOMEM_COS_LSE_AVX2 1
#endif

namespace protomem {
namespace cos_lse {
namespace AVX2 {
template <typename T>
const Kernels<T>* kernels() {
#ifdef PROTOMEM_COS_LSE_AVX2
  return &table<T>();
#else
  return nullptr;
#endif
}
template const Kernels<float>* kernels<float>();
template const Kernels<double>* kernels<double>();
}  // namespace AVX2
}  // namespace cos_lse
}  // namespace protomem
