// Fused per-voxel stages of exposure.preprocess, equal to the NumPy chain operation for operation.
//
// Every float op is an explicit round-to-nearest operation (gh_fsub, gh_fmul, ... from ieee_f32.cuh):
// NumPy rounds after each ufunc, and nvcc would otherwise be free to contract a*b + c into one FMA
// (a single rounding), which changes the last bit, and CuPy's -ftz=true would flush subnormals.
// Slices are blockIdx.y (<= 65535 per launch, the caller chunks), pixels of a slice a grid-stride
// loop over blockIdx.x, so the per-slice constants are read once per thread and no 64-bit division
// per pixel is needed.

#include "ieee_f32.cuh"  // gh_fadd, ...: float32 ops without flush-to-zero (see there)

template <typename T> __device__ __forceinline__ float to_f32(T v) { return (float)v; }
// int -> float and double -> float conversions round to nearest, like NumPy's astype(float32)
template <> __device__ __forceinline__ float to_f32<double>(double v) { return gh_d2f(v); }
template <> __device__ __forceinline__ float to_f32<int>(int v) { return __int2float_rn(v); }

// out = asinh(((float(x) - b_z) * g_z + B - B) / S)   (normalize != 0, ZNorm.apply then asinh_stretch)
// out = asinh((float(x) - B) / S)                      (normalize == 0)
// do_asinh == 0 stores the argument of asinh instead: the parity tests check that part bit for bit.
// asinh itself is computed in double and rounded once. It is the one step that is not bit-exact:
// NumPy's float32 arcsinh is not correctly rounded (on AVX-512 hosts ~0.6% of values differ by
// 1 ulp from float32(asinh(double))), so the documented tolerance is 2 ulp.
template <typename T>
__device__ void znorm_asinh_impl(const T* __restrict__ x, float* __restrict__ out, long long plane,
                                 const float* __restrict__ b, const float* __restrict__ g,
                                 float B, float S, int normalize, int do_asinh)
{
    const int z = blockIdx.y;
    const float bz = normalize ? b[z] : 0.0f, gz = normalize ? g[z] : 1.0f;
    const T* xs = x + (long long)z * plane;
    float* os = out + (long long)z * plane;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += (long long)gridDim.x * blockDim.x) {
        float t = to_f32<T>(xs[i]);
        if (normalize) t = gh_fadd(gh_fmul(gh_fsub(t, bz), gz), B);
        t = gh_fdiv(gh_fsub(t, B), S);
        os[i] = do_asinh ? gh_d2f(asinh(gh_f2d(t))) : t;
    }
}

#define ZNORM_ASINH(SUFFIX, T)                                                                   \
    extern "C" __global__ void znorm_asinh_##SUFFIX(const T* x, float* out, long long plane,       \
                                                    const float* b, const float* g, float B,       \
                                                    float S, int normalize, int do_asinh)          \
    {                                                                                            \
        znorm_asinh_impl<T>(x, out, plane, b, g, B, S, normalize, do_asinh);                     \
    }
ZNORM_ASINH(u8, unsigned char)
ZNORM_ASINH(u16, unsigned short)
ZNORM_ASINH(i16, short)
ZNORM_ASINH(i32, int)
ZNORM_ASINH(f32, float)
ZNORM_ASINH(f64, double)

// robust_scale: y = rint(clip((float(x) - lo_z) * k_z, 0, 255)) as uint8, k_z = float32(255 / (hi - lo))
// computed on the host exactly as the CPU does; valid_z == 0 (hi <= lo, a constant slice) gives 0.
// NaN cannot reach here: the caller checks finiteness first, as the CPU path does.
template <typename T>
__device__ void robust_scale_impl(const T* __restrict__ x, unsigned char* __restrict__ out,
                                  long long plane, const float* __restrict__ lo,
                                  const float* __restrict__ k, const int* __restrict__ valid)
{
    const int z = blockIdx.y;
    const float l = lo[z], s = k[z];
    const int ok = valid[z];
    const T* xs = x + (long long)z * plane;
    unsigned char* os = out + (long long)z * plane;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned char r = 0;
        if (ok) {
            float y = gh_fmul(gh_fsub(to_f32<T>(xs[i]), l), s);
            y = gh_fmin(gh_fmax(y, 0.0f), 255.0f);
            r = (unsigned char)rintf(y);  // rintf: half to even, like np.rint
        }
        os[i] = r;
    }
}

#define ROBUST_SCALE(SUFFIX, T)                                                                  \
    extern "C" __global__ void robust_scale_##SUFFIX(const T* x, unsigned char* out,               \
                                                     long long plane, const float* lo,             \
                                                     const float* k, const int* valid)             \
    {                                                                                            \
        robust_scale_impl<T>(x, out, plane, lo, k, valid);                                       \
    }
ROBUST_SCALE(f32, float)
ROBUST_SCALE(f64, double)

// ---- per-slice extremes ----------------------------------------------------------------------------
//
// Minimum and maximum of every slice of a (slices, plane) array into ext (2, slices): ext[z] the
// minimum, ext[slices + z] the maximum; a NaN anywhere in a float slice makes both NaN (as CuPy's min
// and max propagate it, which the callers' finiteness checks rely on). Exact in any order. Two small
// launches instead of CuPy's four reductions (a two-level min and max) and a stack: on an H200 those
// cost ~270 us of host time per slice, against ~0.2 ms of kernels for the whole CLAHE.
//   slice_extremes_partial  grid (blocks, slices), GH_EXT_THREADS threads: each block's extremes of a
//                           grid-stride share of its slice into part (2, slices, blocks)
//   slice_extremes_final    grid (slices), GH_EXT_THREADS threads: the blocks' extremes -> ext
#define GH_EXT_THREADS 256

// Order and NaN test per type. Floats compare through order-preserving integer keys: CuPy's -ftz=true
// makes float comparisons treat subnormals as 0, which would return a subnormal as the minimum of
// {subnormal, 0}. (Keys order -0.0 below +0.0, where IEEE calls them equal; either is a right answer.)
template <typename T> struct GhOrd {
    __device__ static bool nan(T) { return false; }
    __device__ static bool lt(T a, T b) { return a < b; }
};
template <> struct GhOrd<float> {
    __device__ static unsigned int key(float v) {
        const unsigned int b = __float_as_uint(v);
        return (b >> 31) ? ~b : (b | 0x80000000u);
    }
    __device__ static bool nan(float v) { return (__float_as_uint(v) & 0x7FFFFFFFu) > 0x7F800000u; }
    __device__ static bool lt(float a, float b) { return key(a) < key(b); }
};
template <> struct GhOrd<double> {
    __device__ static unsigned long long key(double v) {
        const unsigned long long b = (unsigned long long)__double_as_longlong(v);
        return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
    }
    __device__ static bool nan(double v) {
        return ((unsigned long long)__double_as_longlong(v) & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull;
    }
    __device__ static bool lt(double a, double b) { return key(a) < key(b); }
};
template <typename T> __device__ __forceinline__ T gh_min_nan(T a, T b)
{ return GhOrd<T>::nan(a) ? a : (GhOrd<T>::nan(b) || GhOrd<T>::lt(b, a) ? b : a); }
template <typename T> __device__ __forceinline__ T gh_max_nan(T a, T b)
{ return GhOrd<T>::nan(a) ? a : (GhOrd<T>::nan(b) || GhOrd<T>::lt(a, b) ? b : a); }

template <typename T>
__device__ void gh_block_extremes(T lo, T hi, T* __restrict__ out_lo, T* __restrict__ out_hi)
{
    __shared__ T slo[GH_EXT_THREADS], shi[GH_EXT_THREADS];
    const int t = threadIdx.x;
    slo[t] = lo;
    shi[t] = hi;
    __syncthreads();
    for (int s = GH_EXT_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            slo[t] = gh_min_nan<T>(slo[t], slo[t + s]);
            shi[t] = gh_max_nan<T>(shi[t], shi[t + s]);
        }
        __syncthreads();
    }
    if (t == 0) { *out_lo = slo[0]; *out_hi = shi[0]; }
}

template <typename T>
__device__ void extremes_partial_impl(const T* __restrict__ x, long long plane, T* __restrict__ part)
{
    const int z = blockIdx.y, nb = gridDim.x, nz = gridDim.y;
    const T* xs = x + (long long)z * plane;
    T lo = xs[0], hi = xs[0];  // an element of the slice: a valid start for every thread
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += (long long)nb * blockDim.x) {
        const T v = xs[i];
        lo = gh_min_nan<T>(lo, v);
        hi = gh_max_nan<T>(hi, v);
    }
    gh_block_extremes<T>(lo, hi, part + (long long)z * nb + blockIdx.x,
                         part + ((long long)nz + z) * nb + blockIdx.x);
}

template <typename T>
__device__ void extremes_final_impl(const T* __restrict__ part, int nb, T* __restrict__ ext)
{
    const int z = blockIdx.x, nz = gridDim.x;
    const T* plo = part + (long long)z * nb;
    const T* phi = part + ((long long)nz + z) * nb;
    T lo = plo[0], hi = phi[0];
    for (int b = threadIdx.x; b < nb; b += blockDim.x) {
        lo = gh_min_nan<T>(lo, plo[b]);
        hi = gh_max_nan<T>(hi, phi[b]);
    }
    gh_block_extremes<T>(lo, hi, ext + z, ext + nz + z);
}

#define EXTREMES_PARTIAL(SUFFIX, T)                                                              \
    extern "C" __global__ void slice_extremes_partial_##SUFFIX(const T* x, long long plane, T* part) \
    { extremes_partial_impl<T>(x, plane, part); }
#define EXTREMES_FINAL(SUFFIX, T)                                                                \
    extern "C" __global__ void slice_extremes_final_##SUFFIX(const T* part, int nb, T* ext)        \
    { extremes_final_impl<T>(part, nb, ext); }
EXTREMES_PARTIAL(u8, unsigned char)
EXTREMES_PARTIAL(i8, signed char)
EXTREMES_PARTIAL(u16, unsigned short)
EXTREMES_PARTIAL(i16, short)
EXTREMES_PARTIAL(i32, int)
EXTREMES_PARTIAL(f32, float)
EXTREMES_PARTIAL(f64, double)
EXTREMES_FINAL(u8, unsigned char)
EXTREMES_FINAL(i8, signed char)
EXTREMES_FINAL(u16, unsigned short)
EXTREMES_FINAL(i16, short)
EXTREMES_FINAL(i32, int)
EXTREMES_FINAL(f32, float)
EXTREMES_FINAL(f64, double)
