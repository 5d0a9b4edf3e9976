// Host-device basics of the scalar math the CPU and CUDA kernels share (gradvac.h, moco.h,
// dual_cone.h): FUSEDJD_HD marks a function callable from host and device code, and the std
// math functions are used by their plain names in both.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDJD_HD __host__ __device__ __forceinline__
#else
#define FUSEDJD_HD inline
#endif

namespace fusedjd {

#if !defined(__CUDA_ARCH__)
using std::exp;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::pow;
using std::sqrt;
#endif

}  // namespace fusedjd
