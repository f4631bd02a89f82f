// IEEE float32 operations that keep subnormals, shared by the kernels that must equal NumPy bit for bit.
// Included textually by gpuheart.backend.kernel_source (so CuPy's cache key, the source, covers it),
// by the host emulator through the same function, and by nvcc from this folder.
#pragma once
//
// Subnormals: CuPy compiles every RawModule with -ftz=true, appended after gpuheart's own options
// (so no option can undo it), and under it even the __f*_rn intrinsics and float <-> double
// conversions become .ftz instructions that flush subnormal inputs and results to zero, where
// NumPy keeps them. The gh_* operations below are the same IEEE operations written as PTX without
// .ftz, which ptxas honours whatever the flag (tests/test_kernels_nvrtc.py checks the PTX). The
// host emulator (no __CUDA_ARCH__) gets the intrinsics, which it implements as plain IEEE ops.
#ifdef __CUDA_ARCH__
#define GH_F32_OP(NAME, OP)                                                                      \
    __device__ __forceinline__ float NAME(float a, float b)                                      \
    { float r; asm(OP " %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
GH_F32_OP(gh_fadd, "add.rn.f32")
GH_F32_OP(gh_fsub, "sub.rn.f32")
GH_F32_OP(gh_fmul, "mul.rn.f32")
GH_F32_OP(gh_fdiv, "div.rn.f32")
GH_F32_OP(gh_fmin, "min.f32")
GH_F32_OP(gh_fmax, "max.f32")
#undef GH_F32_OP
__device__ __forceinline__ float gh_d2f(double v) { float r; asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(v)); return r; }
__device__ __forceinline__ double gh_f2d(float v) { double r; asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(v)); return r; }
#else
__device__ __forceinline__ float gh_fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float gh_fsub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float gh_fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float gh_fdiv(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float gh_fmin(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ float gh_fmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ float gh_d2f(double v) { return __double2float_rn(v); }
__device__ __forceinline__ double gh_f2d(float v) { return (double)v; }
#endif
