// CLAHE equal bit for bit to gpuheart.exposure.clahe (CPU, itself equal to skimage's
// equalize_adapthist). Per chunk of slices; slices are blockIdx.z (or .y):
//   clahe_bin_tables input value -> bin index per slice, from the slice's extremes (skimage's 14-bit
//                    rescale and // (1 + 16384 // nbins) folded into one table, as on the CPU)
//   *_to_bins        input -> bin index through that table
//   clahe_tile_maps  one block per tile: shared-memory histogram, skimage's clip/redistribute,
//                    cumulative map (uint16: maps are <= 16383, half the memory of int32)
//   clahe_interp     per pixel: the float32 bilinear blend of four tile maps, truncated to a level
//   clahe_final_tables + clahe_final   level -> float32 through the per-slice min/max rescale table
// or, for the preprocessing chain (CLAHE then robust scaling), instead of the last two:
//   clahe_level_counts + clahe_robust_tables + clahe_final_u8   level histogram -> uint8 table -> gather
// Every table is built on the device from values already there, so a call copies nothing back per
// slice. Float arithmetic uses explicit round-to-nearest operations (__d*_rn intrinsics; float32: gh_*
// from ieee_f32.cuh, which also keep subnormals) so nvcc cannot contract it into FMAs: the CPU rounds
// after every operation. Offsets that multiply extents are 64-bit.

#include "ieee_f32.cuh"  // gh_fsub, ...: float32 ops without flush-to-zero (see there)



// ---- input -> bins -------------------------------------------------------------------------------

// Integer input: the table covers every value of the dtype (256 or 65536 entries per slice).
template <typename T, typename B>
__device__ void int_to_bins_impl(const T* __restrict__ x, B* __restrict__ bins, long long plane,
                                 const B* __restrict__ tables, int tsize)
{
    const int z = blockIdx.y;
    const B* tab = tables + (long long)z * tsize;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += (long long)gridDim.x * blockDim.x)
        bins[(long long)z * plane + i] = tab[x[(long long)z * plane + i]];
}

// Float input (float32 or float64, the CPU's float_dtype): v = (x - shift) / div when rescale,
// u = rint(v * 65535) clipped to [0, 65535] (img_as_uint), then the 65536-entry table.
template <typename T> __device__ __forceinline__ T sub_rn(T a, T b);
template <typename T> __device__ __forceinline__ T div_rn(T a, T b);
template <typename T> __device__ __forceinline__ T mul_rn(T a, T b);
template <> __device__ __forceinline__ float sub_rn(float a, float b) { return gh_fsub(a, b); }
template <> __device__ __forceinline__ float div_rn(float a, float b) { return gh_fdiv(a, b); }
template <> __device__ __forceinline__ float mul_rn(float a, float b) { return gh_fmul(a, b); }
template <> __device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
template <> __device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
template <> __device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
// half to even, like np.rint
__device__ __forceinline__ float rint_t(float v) { return rintf(v); }
__device__ __forceinline__ double rint_t(double v) { return rint(v); }

template <typename T, typename B>
__device__ void float_to_bins_impl(const T* __restrict__ x, B* __restrict__ bins, long long plane,
                                   const T* __restrict__ shift, const T* __restrict__ div,
                                   const int* __restrict__ rescale, const B* __restrict__ tables)
{
    const int z = blockIdx.y;
    const T sh = shift[z], dv = div[z], umax = (T)65535;
    const int rs = rescale[z];
    const B* tab = tables + (long long)z * 65536;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += (long long)gridDim.x * blockDim.x) {
        T v = x[(long long)z * plane + i];
        if (rs) v = div_rn<T>(sub_rn<T>(v, sh), dv);
        T u = rint_t(mul_rn<T>(v, umax));
        u = u >= (T)0 ? (u > umax ? umax : u) : (T)0;  // a NaN (reported by the caller) reads bin 0
        bins[(long long)z * plane + i] = tab[(unsigned int)u];
    }
}

#define INT_TO_BINS(SUFFIX, T, B)                                                                \
    extern "C" __global__ void int_to_bins_##SUFFIX(const T* x, B* bins, long long plane,         \
                                                    const B* tables, int tsize)                   \
    { int_to_bins_impl<T, B>(x, bins, plane, tables, tsize); }
INT_TO_BINS(u8_b8, unsigned char, unsigned char)
INT_TO_BINS(u8_b16, unsigned char, unsigned short)
INT_TO_BINS(u16_b8, unsigned short, unsigned char)
INT_TO_BINS(u16_b16, unsigned short, unsigned short)

#define FLOAT_TO_BINS(SUFFIX, T, B)                                                              \
    extern "C" __global__ void float_to_bins_##SUFFIX(const T* x, B* bins, long long plane,       \
                                                      const T* shift, const T* div,               \
                                                      const int* rescale, const B* tables)        \
    { float_to_bins_impl<T, B>(x, bins, plane, shift, div, rescale, tables); }
FLOAT_TO_BINS(f32_b8, float, unsigned char)
FLOAT_TO_BINS(f32_b16, float, unsigned short)
FLOAT_TO_BINS(f64_b8, double, unsigned char)
FLOAT_TO_BINS(f64_b16, double, unsigned short)

// ---- per-slice tables built on the device ----------------------------------------------------------
//
// The tables the CPU path builds per slice (gpuheart.exposure._bin_table, _final_table and
// _robust_level_table), computed here from the slice's extremes or level histogram where those already
// are, so a call makes no device->host round trip per slice: on an H200 the host side of those
// tables (copies, syncs, NumPy on 16384-entry arrays) was ~1.4 ms of a 1.6 ms CLAHE call. The same
// float64 / float32 operations in the same order as NumPy, each rounded (the *_rn intrinsics).

// skimage's 14-bit bin of the uint16 value u for a slice whose uint16 extremes are e0 <= e1
// (_bins_of): clip to [e0, e1], rescale to [0, 16383] in float64, round half to even, // div.
__device__ __forceinline__ unsigned int gh_bin_of(double u, double e0, double e1, unsigned int div)
{
    double v = fmin(fmax(u, e0), e1);
    if (e0 != e1) v = __dadd_rn(__dmul_rn(__ddiv_rn(__dsub_rn(v, e0), __dsub_rn(e1, e0)), 16383.0), 0.0);
    else v = fmin(fmax(v, 0.0), 16383.0);
    if (!(v >= 0.0)) v = 0.0;  // NaN extremes (input the caller rejects): keep the bin in range
    return (unsigned int)fmin(rint(v), 16383.0) / div;
}

// img_as_uint of one float: rint(v * 65535) in the float type, clipped to [0, 65535] (NaN -> 0).
template <typename T> __device__ __forceinline__ T gh_as_uint16(T v)
{
    const T u = rint_t(mul_rn<T>(v, (T)65535));
    return u >= (T)0 ? (u > (T)65535 ? (T)65535 : u) : (T)0;
}

template <typename T> __device__ __forceinline__ T gh_from_double(double v);
template <> __device__ __forceinline__ float gh_from_double(double v) { return gh_d2f(v); }
template <> __device__ __forceinline__ double gh_from_double(double v) { return v; }
__device__ __forceinline__ float gh_to_f32(float v) { return v; }
__device__ __forceinline__ float gh_to_f32(double v) { return gh_d2f(v); }
__device__ __forceinline__ double gh_to_f64(float v) { return gh_f2d(v); }  // keeps a subnormal
__device__ __forceinline__ double gh_to_f64(double v) { return v; }

// Grid (blocks, slices): slice z's table (tsize entries: 256 for uint8, else 65536), from its
// extremes ext[z0 + z] (min) and ext[nz + z0 + z] (max). KIND 0: uint8 (skimage's img_as_uint is
// x * 257), 1: uint16, 2: float (T), whose shift / div / rescale (_float_bin_params) are written
// for float_to_bins: (x - min) / (max - min) in T when the slice leaves [0, 1], max - min taken in
// float64 and rounded to T as NumPy does with Python floats.
template <typename T, typename B, int KIND>
__device__ void bin_tables_impl(const T* __restrict__ ext, int nz, int z0, int tsize, unsigned int div,
                                B* __restrict__ tables, T* __restrict__ shift, T* __restrict__ dv,
                                int* __restrict__ rescale)
{
    const int z = blockIdx.y;
    const T lo = ext[z0 + z], hi = ext[nz + z0 + z];
    double e0, e1;
    if constexpr (KIND == 2) {
        const bool rs = lo < (T)0 || hi > (T)1;
        const T sh = rs ? lo : (T)0;
        const T d = rs ? (hi > lo ? gh_from_double<T>(__dsub_rn(gh_to_f64(hi), gh_to_f64(lo))) : (T)__uint_as_float(0x7F800000u)) : (T)1;
        const bool apply = d != (T)1 || sh != (T)0;  // _rescale01
        e0 = gh_to_f64(gh_as_uint16<T>(apply ? div_rn<T>(sub_rn<T>(lo, sh), d) : lo));
        e1 = gh_to_f64(gh_as_uint16<T>(apply ? div_rn<T>(sub_rn<T>(hi, sh), d) : hi));
        if (blockIdx.x == 0 && threadIdx.x == 0) { shift[z] = sh; dv[z] = d; rescale[z] = apply; }
    } else {
        const double s = KIND == 0 ? 257.0 : 1.0;
        e0 = (double)lo * s;
        e1 = (double)hi * s;
    }
    B* tab = tables + (long long)z * tsize;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < tsize; i += gridDim.x * blockDim.x)
        tab[i] = (B)gh_bin_of((double)i * (KIND == 0 ? 257.0 : 1.0), e0, e1, div);
}

#define BIN_TABLES(SUFFIX, T, B, KIND)                                                           \
    extern "C" __global__ void clahe_bin_tables_##SUFFIX(const T* ext, int nz, int z0, int tsize,  \
                                                         unsigned int div, B* tables, T* shift,   \
                                                         T* dv, int* rescale)                     \
    { bin_tables_impl<T, B, KIND>(ext, nz, z0, tsize, div, tables, shift, dv, rescale); }
BIN_TABLES(u8_b8, unsigned char, unsigned char, 0)
BIN_TABLES(u8_b16, unsigned char, unsigned short, 0)
BIN_TABLES(u16_b8, unsigned short, unsigned char, 1)
BIN_TABLES(u16_b16, unsigned short, unsigned short, 1)
BIN_TABLES(f32_b8, float, unsigned char, 2)
BIN_TABLES(f32_b16, float, unsigned short, 2)
BIN_TABLES(f64_b8, double, unsigned char, 2)
BIN_TABLES(f64_b16, double, unsigned short, 2)

// skimage's final rescale of one 14-bit level for a slice whose levels span [imin, imax]
// (_final_table): clip, (v - imin) / (imax - imin) in the float type T, then float32.
template <typename T> __device__ __forceinline__ float gh_final_value(int level, int imin, int imax)
{
    T v = (T)min(max(level, imin), imax);
    if (imin != imax) v = div_rn<T>(sub_rn<T>(v, (T)imin), (T)(imax - imin));
    else v = v > (T)1 ? (T)1 : v;  // clip(v, 0, 1) of a level >= 0
    return gh_to_f32(v);
}

// Grid (blocks, slices): the 16384-entry float32 table of slice z from its levels' extremes
// lext[z] (min) and lext[nz + z] (max).
template <typename T>
__device__ void final_tables_impl(const unsigned short* __restrict__ lext, int nz, float* __restrict__ tables)
{
    const int z = blockIdx.y;
    const int imin = lext[z], imax = lext[nz + z];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < 16384; i += gridDim.x * blockDim.x)
        tables[(long long)z * 16384 + i] = gh_final_value<T>(i, imin, imax);
}
extern "C" __global__ void clahe_final_tables_f32(const unsigned short* lext, int nz, float* tables)
{ final_tables_impl<float>(lext, nz, tables); }
extern "C" __global__ void clahe_final_tables_f64(const unsigned short* lext, int nz, float* tables)
{ final_tables_impl<double>(lext, nz, tables); }

// ---- per-tile clipped histograms and maps ---------------------------------------------------------

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
__device__ long long block_sum(long long v, long long* red)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    long long s = 0;
    for (int i = 0; i < nw; ++i) s += red[i];
    return s;
}

// Grid (ntx, nty, slices); dynamic shared memory nbins ints (the caller keeps nbins <= 4096).
// rowmap/colmap give, for each row/column a tile covers, the image row/column that skimage's
// reflect padding puts there (np.pad of an index ramp, built on the host: exact by construction).
// The first three loops of skimage's clip_histogram are elementwise given block-wide sums, so all
// threads do them; its redistribution loop depends on the running excess, so thread 0 runs it
// exactly as written (it usually ends within the first sweep: the residual excess is < nbins).
template <typename B>
__device__ void tile_maps_impl(const B* __restrict__ bins, int h, int w,
                               const int* __restrict__ rowmap, const int* __restrict__ colmap,
                               int ky, int kx, int nbins, int clim, double scale,
                               unsigned short* __restrict__ maps)
{
    extern __shared__ int hist[];
    __shared__ long long red[32];
    const int tx = blockIdx.x, ty = blockIdx.y, z = blockIdx.z;
    const int ntx = gridDim.x, nty = gridDim.y;
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int b = tid; b < nbins; b += nt) hist[b] = 0;
    __syncthreads();

    const B* img = bins + (long long)z * h * w;
    const int npix = ky * kx;  // < 2^31, checked by the caller
    for (int i = tid; i < npix; i += nt) {
        int r = i / kx, c = i - r * kx;
        int yy = rowmap[ty * ky + r], xx = colmap[tx * kx + c];
        atomicAdd(&hist[img[(long long)yy * w + xx]], 1);
    }
    __syncthreads();

    // clip at clim, collecting the excess
    long long ex = 0;
    for (int b = tid; b < nbins; b += nt)
        if (hist[b] > clim) { ex += hist[b] - clim; hist[b] = clim; }
    long long n_excess = block_sum(ex, red);
    const long long bin_incr = n_excess / nbins;  // n_excess >= 0: C and Python division agree
    const long long upper = clim - bin_incr;
    // raise bins under `upper`, then (skimage builds this mask after the raise) top up to clim
    // the bins in [upper, clim); count the bins still under clim
    long long dex = 0, under = 0;
    for (int b = tid; b < nbins; b += nt) {
        long long v = hist[b];
        if (v < upper) { v += bin_incr; dex -= bin_incr; }
        if (v >= upper && v < clim) { dex += v - clim; v = clim; }
        under += v < clim;
        hist[b] = (int)v;
    }
    n_excess += block_sum(dex, red);
    long long n_under = block_sum(under, red);
    __syncthreads();

    if (tid == 0) {
        while (n_excess > 0) {
            const long long prev = n_excess;
            for (int index = 0; index < nbins; ++index) {
                long long step = n_under / n_excess;  // n_excess > 0 here
                if (step < 1) step = 1;
                for (long long i = index; i < nbins; i += step) {
                    if (hist[i] < clim) {
                        hist[i] += 1;
                        n_excess -= 1;
                        if (hist[i] == clim) n_under -= 1;
                    }
                }
                if (n_excess <= 0) break;
            }
            if (prev == n_excess) break;
        }
        // cumulative histogram in place (sequential: nbins adds, no rounding involved)
        int cum = 0;
        for (int b = 0; b < nbins; ++b) { cum += hist[b]; hist[b] = cum; }
    }
    __syncthreads();

    unsigned short* m = maps + (((long long)z * nty + ty) * ntx + tx) * nbins;
    for (int b = tid; b < nbins; b += nt) {
        double v = fmin(__dmul_rn((double)hist[b], scale), 16383.0);  // float64 as on the CPU
        m[b] = (unsigned short)(int)v;  // truncation, like np.int32(m)
    }
}

#define TILE_MAPS(SUFFIX, B)                                                                     \
    extern "C" __global__ void clahe_tile_maps_##SUFFIX(const B* bins, int h, int w,              \
                                                        const int* rowmap, const int* colmap,     \
                                                        int ky, int kx, int nbins, int clim,      \
                                                        double scale, unsigned short* maps)       \
    { tile_maps_impl<B>(bins, h, w, rowmap, colmap, ky, kx, nbins, clim, scale, maps); }
TILE_MAPS(b8, unsigned char)
TILE_MAPS(b16, unsigned short)

// ---- bilinear blend --------------------------------------------------------------------------------

// Grid (ceil(w / blockDim.x), ceil(h / blockDim.y), slices). Same arithmetic as the CPU's
// _interpolate: float64 weights, each term map * weight in float64 rounded to float32, the four
// terms summed in float32 in skimage's order, truncated to an integer level.
template <typename B>
__device__ void interp_impl(const B* __restrict__ bins, const unsigned short* __restrict__ maps,
                            int h, int w, int ky, int kx, int nty, int ntx, int nbins,
                            unsigned short* __restrict__ levels)
{
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int z = blockIdx.z;
    if (x >= w || y >= h) return;
    const int px = x + kx / 2, bx = px / kx;
    const double f = (double)(px % kx) / (double)kx;
    const double i = 1.0 - f;
    const int s0 = min(max(bx - 1, 0), ntx - 1), s1 = min(bx, ntx - 1);
    const int py = y + ky / 2, by = py / ky;
    const double fy = (double)(py % ky) / (double)ky;
    const double iy = 1.0 - fy;
    const int t0 = min(max(by - 1, 0), nty - 1), t1 = min(by, nty - 1);

    const long long pix = ((long long)z * h + y) * w + x;
    const int v = bins[pix];
    const unsigned short* mz = maps + (long long)z * nty * ntx * nbins;
    const double m00 = mz[((long long)t0 * ntx + s0) * nbins + v];
    const double m01 = mz[((long long)t0 * ntx + s1) * nbins + v];
    const double m10 = mz[((long long)t1 * ntx + s0) * nbins + v];
    const double m11 = mz[((long long)t1 * ntx + s1) * nbins + v];
    float r = gh_d2f(__dmul_rn(m00, __dmul_rn(i, iy)));
    r = gh_fadd(r, gh_d2f(__dmul_rn(m01, __dmul_rn(f, iy))));
    r = gh_fadd(r, gh_d2f(__dmul_rn(m10, __dmul_rn(i, fy))));
    r = gh_fadd(r, gh_d2f(__dmul_rn(m11, __dmul_rn(f, fy))));
    levels[pix] = (unsigned short)r;  // truncation toward zero, r >= 0
}

#define INTERP(SUFFIX, B)                                                                        \
    extern "C" __global__ void clahe_interp_##SUFFIX(const B* bins, const unsigned short* maps,   \
                                                     int h, int w, int ky, int kx, int nty,       \
                                                     int ntx, int nbins, unsigned short* levels)  \
    { interp_impl<B>(bins, maps, h, w, ky, kx, nty, ntx, nbins, levels); }
INTERP(b8, unsigned char)
INTERP(b16, unsigned short)

// ---- final rescale ---------------------------------------------------------------------------------

// Grid-stride over a slice (blockIdx.y = slice); tables hold 16384 float32 per slice. The min()
// only guards memory: a level is a truncated blend of maps <= 16383, so it never exceeds 16383.
extern "C" __global__ void clahe_final(const unsigned short* __restrict__ levels,
                                       const float* __restrict__ tables, long long plane,
                                       float* __restrict__ out)
{
    const int z = blockIdx.y;
    const float* tab = tables + (long long)z * 16384;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += (long long)gridDim.x * blockDim.x) {
        const long long p = (long long)z * plane + i;
        out[p] = tab[min((int)levels[p], 16383)];
    }
}

// ---- fused robust scaling ------------------------------------------------------------------------
//
// robust_scale(clahe(x)) without the float32 image and without sorting it: the final rescale is
// monotone in the level, so the output's order statistics are the rescaled order statistics of the
// levels, which a 16384-bin histogram per slice gives exactly. The host turns the histograms into
// one uint8 table per slice (gpuheart.exposure._robust_level_table, the CPU path's own function)
// and clahe_final_u8 gathers through it.

// counts holds 16384 uint32 per slice (blockIdx.y = slice), zeroed by the caller. Each block counts
// chunks of GH_COUNT_CHUNK consecutive pixels into 16-bit counters in shared memory, two to a word (a
// chunk cannot overflow one), then adds the non-zero ones to the slice's counts. One global atomic per
// pixel was slow (0.47 ms for a 2048 x 2048 slice on an H200): neighbouring pixels share levels, so the
// atomics of a warp collide. Blocks loop over the chunks, so any grid is correct; ceil(plane /
// GH_COUNT_CHUNK) blocks or fewer leave none idle (gpuheart.exposure._LEVEL_COUNT_CHUNK is the same number).
#define GH_COUNT_CHUNK 32768
extern "C" __global__ void clahe_level_counts(const unsigned short* __restrict__ levels,
                                              long long plane, unsigned int* __restrict__ counts)
{
    __shared__ unsigned int pairs[16384 / 2];
    const int z = blockIdx.y;
    const unsigned short* lz = levels + (long long)z * plane;
    unsigned int* cz = counts + (long long)z * 16384;
    for (int b = threadIdx.x; b < 16384 / 2; b += blockDim.x) pairs[b] = 0u;
    __syncthreads();
    for (long long c0 = (long long)blockIdx.x * GH_COUNT_CHUNK; c0 < plane;
         c0 += (long long)gridDim.x * GH_COUNT_CHUNK) {
        const long long c1 = plane - c0 < GH_COUNT_CHUNK ? plane : c0 + GH_COUNT_CHUNK;
        for (long long i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
            const int lv = min((int)lz[i], 16383);
            atomicAdd(pairs + (lv >> 1), 1u << ((lv & 1) << 4));
        }
        __syncthreads();
        for (int b = threadIdx.x; b < 16384 / 2; b += blockDim.x) {
            const unsigned int w = pairs[b];
            if (w) {
                if (w & 0xFFFFu) atomicAdd(cz + 2 * b, w & 0xFFFFu);
                if (w >> 16) atomicAdd(cz + 2 * b + 1, w >> 16);
                pairs[b] = 0u;
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void clahe_final_u8(const unsigned short* __restrict__ levels,
                                          const unsigned char* __restrict__ tables, long long plane,
                                          unsigned char* __restrict__ out)
{
    const int z = blockIdx.y;
    const unsigned char* tab = tables + (long long)z * 16384;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += (long long)gridDim.x * blockDim.x) {
        const long long p = (long long)z * plane + i;
        out[p] = tab[min((int)levels[p], 16383)];
    }
}

// Grid (slices), GH_RT_THREADS threads: slice z's uint8 table over the 14-bit levels from its level
// histogram counts[z] (_robust_level_table): the final rescale spans its first..last present level;
// percentile j interpolates the order statistics klo[j] and khi[j] with weight g[j] (NumPy's linear
// method: _linear_percentile_plan, the same for every slice), found on the cumulative histogram
// (searchsorted right: the first level whose cumulative count exceeds k) and blended as numpy's _lerp
// (float32 difference, float64 blend); then (value - lo) * (255 / (hi - lo)) in float32, clipped to
// [0, 255] and rounded half to even. T is the final rescale's float type.
#define GH_RT_THREADS 256
#define GH_RT_PER (16384 / GH_RT_THREADS)

__device__ __forceinline__ double gh_lerp(float a, float b, double g)
{
    const double d = gh_f2d(gh_fsub(b, a));
    return g >= 0.5 ? __dsub_rn(gh_f2d(b), __dmul_rn(d, __dsub_rn(1.0, g))) : __dadd_rn(gh_f2d(a), __dmul_rn(d, g));
}

template <typename T>
__device__ void robust_tables_impl(const unsigned int* __restrict__ counts, long long klo0, long long klo1,
                                   long long khi0, long long khi1, double g0, double g1,
                                   unsigned char* __restrict__ tables)
{
    __shared__ unsigned long long part[GH_RT_THREADS];
    __shared__ int firsts[GH_RT_THREADS], lasts[GH_RT_THREADS];
    __shared__ int at[4], span[2], valid;
    __shared__ float lo32, k32;
    const int z = blockIdx.x, tid = threadIdx.x;
    const unsigned int* c = counts + (long long)z * 16384;
    const int b0 = tid * GH_RT_PER;
    unsigned long long s = 0;
    int first = 16384, last = -1;
    for (int i = b0; i < b0 + GH_RT_PER; ++i) {
        const unsigned int v = c[i];
        s += v;
        if (v) { first = min(first, i); last = i; }
    }
    part[tid] = s;
    firsts[tid] = first;
    lasts[tid] = last;
    __syncthreads();
    if (tid == 0) {  // 256 partial sums: exclusive prefix and the present span, sequentially
        unsigned long long run = 0;
        int f = 16384, l = -1;
        for (int t = 0; t < GH_RT_THREADS; ++t) {
            const unsigned long long v = part[t];
            part[t] = run;
            run += v;
            f = min(f, firsts[t]);
            l = max(l, lasts[t]);
        }
        span[0] = f;
        span[1] = l;
    }
    __syncthreads();
    const long long ks[4] = {klo0, klo1, khi0, khi1};
    unsigned long long cum = part[tid];
    for (int i = b0; i < b0 + GH_RT_PER; ++i) {
        const unsigned long long prev = cum;
        cum += c[i];
        for (int j = 0; j < 4; ++j)
            if ((long long)prev <= ks[j] && ks[j] < (long long)cum) at[j] = i;
    }
    __syncthreads();
    const int imin = span[0], imax = span[1];
    if (tid == 0) {
        const double p0 = gh_lerp(gh_final_value<T>(at[0], imin, imax), gh_final_value<T>(at[2], imin, imax), g0);
        const double p1 = gh_lerp(gh_final_value<T>(at[1], imin, imax), gh_final_value<T>(at[3], imin, imax), g1);
        const double hi = p1 > p0 ? p1 : gh_f2d(gh_final_value<T>(imax, imin, imax));  // _robust_range
        valid = hi > p0;
        lo32 = gh_d2f(p0);
        k32 = gh_d2f(__ddiv_rn(255.0, __dsub_rn(hi, p0)));
    }
    __syncthreads();
    unsigned char* tab = tables + (long long)z * 16384;
    for (int i = tid; i < 16384; i += GH_RT_THREADS) {
        unsigned char o = 0;
        if (valid) {
            const float y = gh_fmul(gh_fsub(gh_final_value<T>(i, imin, imax), lo32), k32);
            o = (unsigned char)rintf(gh_fmin(gh_fmax(y, 0.0f), 255.0f));
        }
        tab[i] = o;
    }
}
extern "C" __global__ void clahe_robust_tables_f32(const unsigned int* counts, long long klo0, long long klo1,
                                                   long long khi0, long long khi1, double g0, double g1,
                                                   unsigned char* tables)
{ robust_tables_impl<float>(counts, klo0, klo1, khi0, khi1, g0, g1, tables); }
extern "C" __global__ void clahe_robust_tables_f64(const unsigned int* counts, long long klo0, long long klo1,
                                                   long long khi0, long long khi1, double g0, double g1,
                                                   unsigned char* tables)
{ robust_tables_impl<double>(counts, klo0, klo1, khi0, khi1, g0, g1, tables); }
