// Per-slice Otsu thresholds of integer slices (<= 16 bits) on the device, equal bit for bit to
// gpuheart.segment.threshold_slices(values, "otsu") on the host, itself skimage's threshold_otsu of each
// slice. Nothing comes back to the host: the slice extremes (exposure.slice_extremes, exact) stay in device
// memory and the kernels read them there. Two launches per chunk of slices:
//   otsu_hist_*       counts of value - lo_z per slice (lo_z the slice's minimum), into a zeroed
//                     (slices, NBINS) uint32 array, NBINS the dtype's value count (256 or 65536).
//                     Slices are blockIdx.y, pixels a grid-stride loop over blockIdx.x. A span
//                     hi_z - lo_z + 1 of at most SHARED bins is counted in shared memory and the
//                     non-zero counters are added to the global ones; wider spans use global atomics.
//   otsu_threshold_*  one block per slice: the integer prefix sums of the counts and of count * value
//                     (a block scan over contiguous per-thread segments), skimage's between-class
//                     variance for every cut, and its first maximum; writes lo_z + that index as a
//                     double (a constant slice: lo_z).
//
// skimage (0.2x) on the trimmed histogram c (float32) with integer bin centres v, per cut i < n - 1:
//   weight1 = cumsum(c), weight2 = reversed cumsum(c)         float32, exact: sums <= plane <= 2**24
//   mean1 = cumsum(c * v) / weight1, mean2 = rev cumsum / weight2   float64 (float32 * int64 -> float64);
//                     the sums are exact integers (|sum| < 2**40), so only the divisions round
//   variance12 = float32(weight1[i] * weight2[i+1]) * (mean1[i] - mean2[i+1])**2   (the float32 product
//                     rounds to float32 before the float64 multiply: NumPy evaluates left to right)
//   threshold = v[argmax(variance12)]                          the first maximum
// Here the sums are 64-bit integers (exact, any order), every float op an explicit round-to-nearest
// operation (__d*_rn; float32: gh_fmul from ieee_f32.cuh, no flush-to-zero), so nvcc can contract
// nothing. The host caller guarantees plane <= 2**24.

#include "ieee_f32.cuh"  // gh_fmul, gh_f2d: float32 ops without flush-to-zero (see there)

#define OTSU_THREADS 256           // blockDim.x of both kernels (gpuheart.segment._OTSU_THREADS)

// ---- histogram -----------------------------------------------------------------------------------

template <typename T, int NBINS, int SHARED>
__device__ void otsu_hist_impl(const T* __restrict__ x, long long plane, const T* __restrict__ lo,
                               const T* __restrict__ hi, unsigned int* __restrict__ counts)
{
    __shared__ unsigned int h[SHARED];
    const int z = blockIdx.y;
    const int l = (int)lo[z];
    const int span = (int)hi[z] - l + 1;      // 1 .. NBINS
    const T* xs = x + (long long)z * plane;
    unsigned int* cz = counts + (long long)z * NBINS;
    const long long stride = (long long)gridDim.x * blockDim.x;
    if (span > SHARED) {                       // a wide slice: one global atomic per pixel
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane; i += stride)
            atomicAdd(cz + ((int)xs[i] - l), 1u);
        return;                                // the whole block takes this branch: no barrier skipped
    }
    for (int b = threadIdx.x; b < span; b += blockDim.x) h[b] = 0u;
    __syncthreads();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane; i += stride)
        atomicAdd(h + ((int)xs[i] - l), 1u);
    __syncthreads();
    for (int b = threadIdx.x; b < span; b += blockDim.x)
        if (h[b]) atomicAdd(cz + b, h[b]);
}

// 8-bit types: all 256 values fit in shared memory. 16-bit: spans up to 8192 (32 KiB), which the
// difference of medians of uint8 slices (at most 511) always is.
#define OTSU_HIST(SUFFIX, T, NBINS, SHARED)                                                      \
    extern "C" __global__ void otsu_hist_##SUFFIX(                                               \
        const T* x, long long plane, const T* lo, const T* hi, unsigned int* counts)             \
    {                                                                                            \
        otsu_hist_impl<T, NBINS, SHARED>(x, plane, lo, hi, counts);                              \
    }
OTSU_HIST(u8, unsigned char, 256, 256)
OTSU_HIST(i8, signed char, 256, 256)
OTSU_HIST(u16, unsigned short, 65536, 8192)
OTSU_HIST(i16, short, 65536, 8192)

// ---- Otsu's cut ----------------------------------------------------------------------------------

template <typename T, int NBINS>
__device__ void otsu_threshold_impl(const unsigned int* __restrict__ counts, const T* __restrict__ lo,
                                    const T* __restrict__ hi, double* __restrict__ out)
{
    __shared__ long long sw[OTSU_THREADS];     // per-thread count sums, then their inclusive scan
    __shared__ long long ss[OTSU_THREADS];     // per-thread sums of count * (value - lo)
    __shared__ double bv[OTSU_THREADS];        // block argmax: best variance and its cut
    __shared__ int bi[OTSU_THREADS];
    const int z = blockIdx.x;
    const int t = threadIdx.x;
    const long long l = (long long)lo[z];
    const int n = (int)((long long)hi[z] - l + 1);
    const unsigned int* c = counts + (long long)z * NBINS;
    // thread t owns the contiguous bins [b0, b1): cuts are visited in increasing order per thread
    // and across threads, so "strictly greater" per thread and "lower index on ties" across
    // threads give NumPy's first maximum
    const int seg = (n + OTSU_THREADS - 1) / OTSU_THREADS;
    const int b0 = min(n, t * seg), b1 = min(n, b0 + seg);
    long long w = 0, s = 0;
    for (int k = b0; k < b1; ++k) {
        w += c[k];
        s += (long long)c[k] * k;
    }
    sw[t] = w;
    ss[t] = s;
    __syncthreads();
    for (int off = 1; off < OTSU_THREADS; off <<= 1) {   // Hillis-Steele inclusive scan
        const long long aw = t >= off ? sw[t - off] : 0, as = t >= off ? ss[t - off] : 0;
        __syncthreads();
        sw[t] += aw;
        ss[t] += as;
        __syncthreads();
    }
    const long long N = sw[OTSU_THREADS - 1];                 // pixels of the slice
    const long long S = ss[OTSU_THREADS - 1] + l * N;         // sum of the values
    long long w1 = sw[t] - w, s1 = ss[t] - s;                  // before this thread's first bin
    double best = -1.0;
    int best_i = 0x7fffffff;
    for (int k = b0; k < b1 && k < n - 1; ++k) {
        w1 += c[k];
        s1 += (long long)c[k] * k;
        const long long w2 = N - w1;                           // > 0: the last bin is not empty
        const long long s1v = s1 + l * w1;                     // sum of count * value up to k
        const double m1 = __ddiv_rn((double)s1v, (double)w1);
        const double m2 = __ddiv_rn((double)(S - s1v), (double)w2);
        const double d = __dsub_rn(m1, m2);
        const float ww = gh_fmul((float)w1, (float)w2);        // exact conversions: w1, w2 <= 2**24
        const double v = __dmul_rn(gh_f2d(ww), __dmul_rn(d, d));
        if (v > best) {
            best = v;
            best_i = k;
        }
    }
    bv[t] = best;
    bi[t] = best_i;
    __syncthreads();
    for (int half = OTSU_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) {
            const double v = bv[t + half];
            const int i = bi[t + half];
            if (v > bv[t] || (v == bv[t] && i < bi[t])) {
                bv[t] = v;
                bi[t] = i;
            }
        }
        __syncthreads();
    }
    if (t == 0) out[z] = (double)(l + (n > 1 ? bi[0] : 0));
}

#define OTSU_THRESHOLD(SUFFIX, T, NBINS)                                                         \
    extern "C" __global__ void otsu_threshold_##SUFFIX(                                          \
        const unsigned int* counts, const T* lo, const T* hi, double* out)                       \
    {                                                                                            \
        otsu_threshold_impl<T, NBINS>(counts, lo, hi, out);                                      \
    }
OTSU_THRESHOLD(u8, unsigned char, 256)
OTSU_THRESHOLD(i8, signed char, 256)
OTSU_THRESHOLD(u16, unsigned short, 65536)
OTSU_THRESHOLD(i16, short, 65536)
