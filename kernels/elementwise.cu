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
