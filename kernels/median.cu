// 2D median filters on every (y, x) slice of a (z, y, x) slab; blockIdx.z is the slice.
//
// Reference: gpuheart.filters.median (CPU), which equals scipy.ndimage.median_filter. Every
// answer here is a value selected from the window (no arithmetic on values), so exactness only
// needs the same total order and the same border values:
//   * order: uint8/uint16 compare as unsigned; float32 compares through order-preserving uint32
//     keys with every NaN made one canonical quiet NaN above +inf (the CPU _f32_keys), so NaN
//     never needs a branch and -0.0 sorts just below +0.0 exactly as on the CPU;
//   * borders: the host passes rowmap/colmap, the CPU's _index_map (NumPy's pad applied to
//     arange, -1 = cval), and the tile loader gathers through them. That is padding fused into
//     the load: no padded copy of the slab is written, and the filter only computes the valid
//     region of the (virtually) padded slice.
//
// Five kernels. median_net and median_radix use a block of 32 x 8 threads computing a 32 x 32
// output tile (4 rows per thread, so a tile's halo is loaded once for 4x the outputs of a
// one-row thread):
//   median_net<T, SIZE>   SIZE 5 (and 3 where median3 is switched off): forgetful selection
//                         (Paeth/Devillard) in registers, fully unrolled min/max exchanges; loads
//                         each window value exactly once.
//   median_radix<T>       any odd size (used for float32 7..31): bitwise radix selection of the
//                         k-th smallest key per pixel, counting over the window from shared memory.
//                         Passes = bit length of (window min XOR window max), so smooth regions
//                         cost few passes; at most 8 / 16 / 32 for uint8 / uint16 / float32.
//   median_hist<T, N>     uint8 / uint16, 7..31: a sliding histogram per output column (below;
//                         its own block of 64 / 32 x 1 threads, each computing 32 rows); for uint16 only
//                         17..31 and the fallback of median_hist16.
//   median_hist16         uint16, 7..15: the same with 16 lanes per column (below; 128 threads, 8
//                         columns, 64 rows a block).
//   median3<T>            3 x 3: sorted row triples, one thread per column sliding down 16 rows
//                         (below; no shared memory).
//
// Launch configuration (grid, block, which kernel) lives in Python next to the dispatch
// (gpuheart.filters._cuda_plan); the tile constants below must match it.
//
// Compiled by NVRTC at run time with only the instantiation a call needs (name_expressions);
// nvcc (CI: -std=c++17 --cubin) gets every instantiation from the explicit list at the end.

#define GH_TILE_X 32      // output columns per block (= blockDim.x: one warp spans a tile row)
#define GH_BLOCK_Y 8      // blockDim.y
#define GH_ROWS 4         // output rows per thread
#define GH_TILE_Y (GH_BLOCK_Y * GH_ROWS)
#define GH_MAX_R 15       // size 31

// Element offsets are 64-bit: a 2048 x 2048 slab of a few hundred slices passes 2**31 elements.
// (Not size_t: NVRTC compiles this without any header.)
typedef unsigned long long gh_index;

__device__ __forceinline__ unsigned int gh_min(unsigned int a, unsigned int b) { return a < b ? a : b; }
__device__ __forceinline__ unsigned int gh_max(unsigned int a, unsigned int b) { return a < b ? b : a; }

// Per dtype: S is the shared-memory storage of a key (keeping uint8/uint16 narrow quarters /
// halves the tile, so more blocks fit per SM), bits_of/key/value convert raw element <-> key.
template <typename T> struct MedianTraits;

template <> struct MedianTraits<unsigned char> {
    typedef unsigned char S;
    __device__ static unsigned int bits_of(unsigned char v) { return v; }
    __device__ static unsigned int key(unsigned int b) { return b & 0xFFu; }
    __device__ static unsigned char value(unsigned int k) { return (unsigned char)k; }
};

template <> struct MedianTraits<unsigned short> {
    typedef unsigned short S;
    __device__ static unsigned int bits_of(unsigned short v) { return v; }
    __device__ static unsigned int key(unsigned int b) { return b & 0xFFFFu; }
    __device__ static unsigned short value(unsigned int k) { return (unsigned short)k; }
};

template <> struct MedianTraits<float> {
    typedef unsigned int S;
    __device__ static unsigned int bits_of(float v) { return __float_as_uint(v); }
    __device__ static unsigned int key(unsigned int b) {
        // Any NaN (either sign, any payload) becomes the canonical +qNaN the CPU uses, whose key
        // is above +inf's. Negative floats reverse their order under ~, positives sit above.
        if ((b & 0x7FFFFFFFu) > 0x7F800000u) b = 0x7FC00000u;
        return (b >> 31) ? ~b : (b | 0x80000000u);
    }
    __device__ static float value(unsigned int k) {
        return __uint_as_float((k >> 31) ? (k & 0x7FFFFFFFu) : ~k);
    }
};

// Fill the (TILE_Y + 2r) x (TILE_X + 2r) key tile of this block from the virtually padded slice.
// Consecutive threads take consecutive columns, so the global reads of a warp are coalesced
// (colmap is the identity away from the left/right borders) and the shared stores conflict-free.
// (y0, x0) is the tile's top-left corner in the padded slice = its first output pixel.
template <typename T>
__device__ __forceinline__ void gh_load_tile(typename MedianTraits<T>::S* tile, int TH, int TW,
                                             const T* __restrict__ src, const int* __restrict__ rowmap,
                                             const int* __restrict__ colmap, int H, int W, int r,
                                             unsigned int cval_bits, gh_index zoff, int y0, int x0) {
    typedef MedianTraits<T> Tr;
    const int Hp = H + 2 * r, Wp = W + 2 * r;
    const unsigned int ckey = Tr::key(cval_bits);
    const int nthreads = blockDim.x * blockDim.y;
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < TH * TW; i += nthreads) {
        const int ty = i / TW, tx = i - ty * TW;
        const int py = y0 + ty, px = x0 + tx;
        unsigned int k = 0;  // beyond the padded slice: feeds only outputs that are never written
        if (py < Hp && px < Wp) {
            const int sy = rowmap[py], sx = colmap[px];
            k = (sy < 0 || sx < 0) ? ckey
                                   : Tr::key(Tr::bits_of(src[zoff + (gh_index)sy * (gh_index)W + (gh_index)sx]));
        }
        tile[i] = (typename Tr::S)k;
    }
}

// sort2: a <= b afterwards (two IMNMX, no branch).
__device__ __forceinline__ void gh_sort2(unsigned int& a, unsigned int& b) {
    const unsigned int lo = gh_min(a, b);
    b = gh_max(a, b);
    a = lo;
}

// Move the minimum of v[LO..HI] to v[LO] and the maximum to v[HI] (a permutation otherwise).
// All indices are compile-time after unrolling, so v stays in registers.
template <int LO, int HI, int M>
__device__ __forceinline__ void gh_minmax(unsigned int (&v)[M]) {
    gh_sort2(v[LO], v[HI]);
#pragma unroll
    for (int i = LO + 1; i < HI; ++i) {
        gh_sort2(v[LO], v[i]);
        gh_sort2(v[i], v[HI]);
    }
}

// Forgetful selection of the median of the SIZE x SIZE window whose top-left key is w[0].
// With n = 2k + 1 values, hold m = k + 2 of them: the minimum of any k + 2 values has k + 1
// values at or above it, so it ranks below k and can be forgotten, and symmetrically the
// maximum; each step drops both and takes one new value. After n - m steps three values remain
// (v[k-1..k+1]) and their middle is the median. Ties are harmless: only values are returned.
template <int STEP, int K, int M, int SIZE, typename S>
__device__ __forceinline__ void gh_forget(unsigned int (&v)[M], const S* w, int pitch) {
    if constexpr (STEP == K - 1) {  // all n values consumed; three remain
        gh_minmax<K - 1, K + 1, M>(v);
    } else {  // live set is v[STEP .. M-1]
        gh_minmax<STEP, M - 1, M>(v);
        constexpr int i = M + STEP;  // next window value, row-major
        v[M - 1] = w[(i / SIZE) * pitch + (i % SIZE)];
        gh_forget<STEP + 1, K, M, SIZE, S>(v, w, pitch);
    }
}

template <int SIZE, typename S>
__device__ __forceinline__ unsigned int gh_forgetful_median(const S* w, int pitch) {
    constexpr int N = SIZE * SIZE, K = N / 2, M = K + 2;
    unsigned int v[M];
#pragma unroll
    for (int i = 0; i < M; ++i) v[i] = w[(i / SIZE) * pitch + (i % SIZE)];
    gh_forget<0, K, M, SIZE>(v, w, pitch);
    return v[K];
}

template <typename T, int SIZE>
__global__ void __launch_bounds__(GH_TILE_X * GH_BLOCK_Y)
median_net(const T* __restrict__ src, T* __restrict__ dst, const int* __restrict__ rowmap,
           const int* __restrict__ colmap, int H, int W, unsigned int cval_bits) {
    typedef MedianTraits<T> Tr;
    typedef typename Tr::S S;
    constexpr int R = SIZE / 2, TH = GH_TILE_Y + 2 * R, TW = GH_TILE_X + 2 * R;
    __shared__ S tile[TH * TW];  // <= 36 x 36 x 4 B
    const gh_index zoff = (gh_index)blockIdx.z * (gh_index)H * (gh_index)W;
    gh_load_tile<T>(tile, TH, TW, src, rowmap, colmap, H, W, R, cval_bits, zoff,
                    blockIdx.y * GH_TILE_Y, blockIdx.x * GH_TILE_X);
    __syncthreads();  // the only barrier: threads may leave below
    const int x = blockIdx.x * GH_TILE_X + threadIdx.x;
    const int ty = threadIdx.y * GH_ROWS;
    if (x >= W) return;
    // A warp reads 32 consecutive keys of one tile row per load: conflict-free for every S.
#pragma unroll 1
    for (int q = 0; q < GH_ROWS; ++q) {
        const int y = blockIdx.y * GH_TILE_Y + ty + q;
        if (y >= H) break;
        const unsigned int k = gh_forgetful_median<SIZE>(tile + (ty + q) * TW + threadIdx.x, TW);
        dst[zoff + (gh_index)y * (gh_index)W + (gh_index)x] = Tr::value(k);
    }
}

template <typename T>
__global__ void __launch_bounds__(GH_TILE_X * GH_BLOCK_Y)
median_radix(const T* __restrict__ src, T* __restrict__ dst, const int* __restrict__ rowmap,
             const int* __restrict__ colmap, int H, int W, unsigned int cval_bits, int size) {
    typedef MedianTraits<T> Tr;
    typedef typename Tr::S S;
    // Sized for size 31 whatever the call: at most 62 x 62 x 4 B = 15.4 KB (float32), under the
    // 48 KB static limit, and 8 resident blocks (2048 threads / 256) still fit an SM's shared
    // memory, so the unused part costs no occupancy.
    __shared__ S tile[(GH_TILE_Y + 2 * GH_MAX_R) * (GH_TILE_X + 2 * GH_MAX_R)];
    const int r = size / 2, TH = GH_TILE_Y + 2 * r, TW = GH_TILE_X + 2 * r;
    const gh_index zoff = (gh_index)blockIdx.z * (gh_index)H * (gh_index)W;
    gh_load_tile<T>(tile, TH, TW, src, rowmap, colmap, H, W, r, cval_bits, zoff,
                    blockIdx.y * GH_TILE_Y, blockIdx.x * GH_TILE_X);
    __syncthreads();  // the only barrier: threads may leave below
    const int x = blockIdx.x * GH_TILE_X + threadIdx.x;
    const int ty = threadIdx.y * GH_ROWS;
    const int y0 = blockIdx.y * GH_TILE_Y + ty;
    if (x >= W || y0 >= H) return;

    // The GH_ROWS windows of this thread are stacked: output q uses rows q .. q+size-1 of the
    // span of size + GH_ROWS - 1 rows, so each key is read once per pass for all of them. j is
    // the same across a warp, so the row guards are uniform (no divergence).
    const S* col = tile + ty * TW + threadIdx.x;
    const int span = size + GH_ROWS - 1;
    const int kth = (size * size) / 2;

    unsigned int lo[GH_ROWS], hi[GH_ROWS];
#pragma unroll
    for (int q = 0; q < GH_ROWS; ++q) { lo[q] = 0xFFFFFFFFu; hi[q] = 0u; }
    for (int j = 0; j < span; ++j) {
        const S* row = col + j * TW;
        for (int dx = 0; dx < size; ++dx) {
            const unsigned int v = row[dx];
#pragma unroll
            for (int q = 0; q < GH_ROWS; ++q)
                if ((unsigned int)(j - q) < (unsigned int)size) { lo[q] = gh_min(lo[q], v); hi[q] = gh_max(hi[q], v); }
        }
    }

    // The median lies in [lo, hi], and every key there shares the bits of lo above the highest
    // bit where lo and hi differ: only the bits below need a counting pass. One bit count for
    // all GH_ROWS outputs keeps the pass loop uniform; below any output's own count it is still
    // exact (the range [base, base + 2**nbits) still holds [lo, hi] and starts at count 0).
    int nbits = 0;
#pragma unroll
    for (int q = 0; q < GH_ROWS; ++q) {
        const unsigned int d = lo[q] ^ hi[q];
        const int L = d ? 32 - __clz((int)d) : 0;
        nbits = L > nbits ? L : nbits;
    }
    const unsigned int low = nbits >= 32 ? 0xFFFFFFFFu : ((1u << nbits) - 1u);
    unsigned int ans[GH_ROWS];
#pragma unroll
    for (int q = 0; q < GH_ROWS; ++q) ans[q] = lo[q] & ~low;

    // Greedy MSB-first search for the largest t with #{v < t} <= kth, which is the kth smallest
    // (0-based) value: #{v < median} <= kth < #{v <= median}.
    for (int b = nbits - 1; b >= 0; --b) {
        unsigned int t[GH_ROWS];
        int cnt[GH_ROWS];
#pragma unroll
        for (int q = 0; q < GH_ROWS; ++q) { t[q] = ans[q] | (1u << b); cnt[q] = 0; }
        for (int j = 0; j < span; ++j) {
            const S* row = col + j * TW;
            for (int dx = 0; dx < size; ++dx) {
                const unsigned int v = row[dx];
#pragma unroll
                for (int q = 0; q < GH_ROWS; ++q)
                    if ((unsigned int)(j - q) < (unsigned int)size) cnt[q] += (v < t[q]) ? 1 : 0;
            }
        }
#pragma unroll
        for (int q = 0; q < GH_ROWS; ++q)
            if (cnt[q] <= kth) ans[q] = t[q];
    }

#pragma unroll
    for (int q = 0; q < GH_ROWS; ++q) {
        const int y = y0 + q;
        if (y < H) dst[zoff + (gh_index)y * (gh_index)W + (gh_index)x] = Tr::value(ans[q]);
    }
}

// median_hist<T, NARROW>, uint8 and uint16, sizes 7..31: Huang's sliding histogram, one thread
// per output column. The thread counts its first window, then slides down GH_HIST_ROWS rows, each
// step taking out the window's top row and adding the next one (2 * size updates) and following
// the median from where it was, since it moves little between neighbouring pixels. Per output
// that is about 2 * size counter updates plus a few steps, where the radix kernel needs
// size * size comparisons for every bit it resolves.
//   uint8:  one 256-bin histogram per thread;
//   uint16: a 256-bin histogram of the high bytes (coarse) and, for one coarse bin f, a 256-bin
//           histogram of the low bytes with a 16-bin summary (fine, mid). The slide keeps them
//           current; when the median moves to another coarse bin m (on noisy data, most rows)
//           one pass over the window un-counts f's keys and counts m's, so nothing is zeroed,
//           and the summary finds the median's low byte in at most 16 + 16 steps.
// NARROW (sizes <= 15, the pipeline's 15 x 15): a window holds at most 225 keys, so counters are
// 8 bits, four to a word, and the tile is sized for radius 7: half the shared memory of the
// general case (16-bit counters, up to 961 keys, radius 15), so twice the resident warps.
// Counters are packed in 32-bit words interleaved by thread (word i of thread t at i * COLS + t):
// a warp's 32 threads always hit 32 different banks, whatever bins they update.
#define GH_HIST_ROWS 32   // output rows per thread (= per block)

template <typename T> struct HistTraits;
template <> struct HistTraits<unsigned char> { enum { COLS = 64, FINE = 0 }; };
template <> struct HistTraits<unsigned short> { enum { COLS = 32, FINE = 1 }; };

// Counter b of a thread whose first word is h[0]; BITS = 8 or 16 per counter.
template <int COLS, int BITS>
__device__ __forceinline__ int gh_cnt(const unsigned int* h, int b) {
    constexpr int PER = 32 / BITS;
    return (int)((h[(b / PER) * COLS] >> ((b % PER) * BITS)) & ((1u << BITS) - 1u));
}

// Add d (+1 or -1) to counter b. A shared atomic whose result is unused compiles to a
// fire-and-forget ATOMS.ADD, so the thread does not wait out a load -> add -> store chain per
// update; only this thread ever touches the word (atomicity is not the point). A decrement only
// ever meets a counter >= 1, so no borrow crosses into the neighbouring counter.
template <int COLS, int BITS>
__device__ __forceinline__ void gh_add(unsigned int* h, int b, int d) {
    constexpr int PER = 32 / BITS;
    atomicAdd(h + (b / PER) * COLS, (unsigned int)d << ((b % PER) * BITS));
}

template <typename T, int NARROW>
__global__ void __launch_bounds__(HistTraits<T>::COLS)
median_hist(const T* __restrict__ src, T* __restrict__ dst, const int* __restrict__ rowmap,
            const int* __restrict__ colmap, int H, int W, unsigned int cval_bits, int size) {
    typedef MedianTraits<T> Tr;
    typedef typename Tr::S S;
    constexpr int COLS = HistTraits<T>::COLS, FINE = HistTraits<T>::FINE, SHIFT = FINE ? 8 : 0;
    constexpr int BITS = NARROW ? 8 : 16, PER = 32 / BITS, MAXR = NARROW ? 7 : GH_MAX_R;
    __shared__ S tile[(GH_HIST_ROWS + 2 * MAXR) * (COLS + 2 * MAXR)];
    __shared__ unsigned int coarse_all[256 / PER * COLS];
    __shared__ unsigned int fine_all[FINE ? 256 / PER * COLS : 1];
    __shared__ unsigned int mid_all[FINE ? 16 / PER * COLS : 1];
    const int r = size / 2, TH = GH_HIST_ROWS + 2 * r, TW = COLS + 2 * r;
    const int y0 = blockIdx.y * GH_HIST_ROWS, x0 = blockIdx.x * COLS;
    const gh_index zoff = (gh_index)blockIdx.z * (gh_index)H * (gh_index)W;
    gh_load_tile<T>(tile, TH, TW, src, rowmap, colmap, H, W, r, cval_bits, zoff, y0, x0);
    unsigned int* coarse = coarse_all + threadIdx.x;
    for (int i = 0; i < 256 / PER; ++i) coarse[i * COLS] = 0u;
    if constexpr (FINE) {
        for (int i = 0; i < 256 / PER; ++i) fine_all[i * COLS + threadIdx.x] = 0u;
        for (int i = 0; i < 16 / PER; ++i) mid_all[i * COLS + threadIdx.x] = 0u;
    }
    __syncthreads();  // the only barrier: threads may leave below
    const int x = x0 + threadIdx.x;
    if (x >= W) return;
    const int rows = H - y0 < GH_HIST_ROWS ? H - y0 : GH_HIST_ROWS;
    const S* col = tile + threadIdx.x;  // key dx of window row j of output i: col[(i + j) * TW + dx]
    const int kth = (size * size) / 2;
    for (int j = 0; j < size; ++j)
        for (int dx = 0; dx < size; ++dx) gh_add<COLS, BITS>(coarse, col[j * TW + dx] >> SHIFT, 1);

    // Invariants: lb = #{keys in coarse bins < m}, and the median is in bin m once
    // lb <= kth < lb + count(m). fine/mid count the low bytes of the keys in coarse bin f (256:
    // none yet), flb = #{keys in bin f with low byte < fm}.
    int m = 0, lb = 0, f = 256, fm = 0, flb = 0;
    for (int i = 0; i < rows; ++i) {
        if (i > 0) {
            const S* gone = col + (i - 1) * TW;
            const S* come = col + (i - 1 + size) * TW;
            unsigned int po = gone[0], pn = come[0];  // keys loaded one step ahead of their updates
            for (int dx = 0; dx < size; ++dx) {
                const unsigned int vo = po, vn = pn;
                if (dx + 1 < size) { po = gone[dx + 1]; pn = come[dx + 1]; }
                const int co = (int)(vo >> SHIFT), cn = (int)(vn >> SHIFT);
                gh_add<COLS, BITS>(coarse, co, -1);
                gh_add<COLS, BITS>(coarse, cn, 1);
                lb += (int)(cn < m) - (int)(co < m);
                if constexpr (FINE) {
                    unsigned int* fine = fine_all + threadIdx.x;
                    unsigned int* mid = mid_all + threadIdx.x;
                    const int lo = (int)(vo & 255u), ln = (int)(vn & 255u);
                    if (co == f) { gh_add<COLS, BITS>(fine, lo, -1); gh_add<COLS, BITS>(mid, lo >> 4, -1); flb -= (int)(lo < fm); }
                    if (cn == f) { gh_add<COLS, BITS>(fine, ln, 1); gh_add<COLS, BITS>(mid, ln >> 4, 1); flb += (int)(ln < fm); }
                }
            }
        }
        // m stays in [0, 255]: lb > kth means some key lies below bin m, and the window holds
        // more than kth keys, so the upward walk stops at the last non-empty bin at the latest.
        while (lb > kth) { --m; lb -= gh_cnt<COLS, BITS>(coarse, m); }
        for (;;) { const int c = gh_cnt<COLS, BITS>(coarse, m); if (lb + c > kth) break; lb += c; ++m; }
        unsigned int key = (unsigned int)m;
        if constexpr (FINE) {
            unsigned int* fine = fine_all + threadIdx.x;
            unsigned int* mid = mid_all + threadIdx.x;
            const int kr = kth - lb;  // the median's rank among the keys of coarse bin m
            if (m != f) {
                // Keys are loaded four at a time ahead of their updates, so the loads overlap.
                auto retarget = [&](unsigned int v) {
                    const int h = (int)(v >> 8), lo = (int)(v & 255u);
                    const int d = (int)(h == m) - (int)(h == f);
                    if (d) { gh_add<COLS, BITS>(fine, lo, d); gh_add<COLS, BITS>(mid, lo >> 4, d); }
                };
                for (int j = 0; j < size; ++j) {
                    const S* row = col + (i + j) * TW;
                    int dx = 0;
                    for (; dx + 4 <= size; dx += 4) {
                        const unsigned int v0 = row[dx], v1 = row[dx + 1], v2 = row[dx + 2], v3 = row[dx + 3];
                        retarget(v0); retarget(v1); retarget(v2); retarget(v3);
                    }
                    for (; dx < size; ++dx) retarget(row[dx]);
                }
                f = m; flb = 0;
                int g = 0;
                for (;;) { const int c = gh_cnt<COLS, BITS>(mid, g); if (flb + c > kr) break; flb += c; ++g; }
                fm = g << 4;
            }
            while (flb > kr) { --fm; flb -= gh_cnt<COLS, BITS>(fine, fm); }
            for (;;) { const int c = gh_cnt<COLS, BITS>(fine, fm); if (flb + c > kr) break; flb += c; ++fm; }
            key = ((unsigned int)m << 8) | (unsigned int)fm;
        }
        dst[zoff + (gh_index)(y0 + i) * (gh_index)W + (gh_index)x] = Tr::value(key);
    }
}

// ---- uint16, 7 x 7 .. 15 x 15: one sliding histogram per column, kept by 16 lanes ------------------
//
// median_hist16: median_hist's thread per column loses on noisy uint16: the median changes coarse
// bin on most rows, and a thread then rebuilds its fine histogram from the whole window (225 keys, one
// at a time) and walks up to 32 counters, each step waiting on the last; a warp waits for its slowest
// thread, and 21 KB of histograms per 32 columns leaves an SM few warps to hide that. Here a group of
// 16 lanes owns a column (two columns a warp): a row's 2 * size updates, a rebuild and every search
// are split over the 16 lanes.
//   coarse: 256 byte counters of the keys' high bytes; the median's coarse bin m and the keys below
//           it (lb) are followed from row to row (lb kept by two ballots a row), since the median
//           moves a few coarse bins at most between neighbouring rows;
//   fine:   byte counters of the full keys of GH_H16_BAND consecutive coarse bins [F, F + BAND), bin h
//           in slot h % BAND, so the median may wander over BAND coarse bins before the group rebuilds
//           the band around it: zero the slots, count the window's keys that fall in the new band.
// Byte counters: a window holds at most 225 keys (and 240 while a row is half updated), so every
// counter, and every sum of counters, fits a byte: words add bytewise with no carry. Bin b of a
// 256-counter histogram is byte b >> 6 of word b & 63, so the neighbouring bins that a column's keys
// hit together lie in different words and banks, and a group's atomics seldom collide.
// gh_select256 finds the k-th key of such a histogram: the lane (16 bins each) by a prefix sum over
// the group, then the bin by another.
// Blocks of GH_H16_WARPS warps: 2 * WARPS columns, GH_H16_ROWS rows; outputs are staged in shared
// memory and written row by row at the end (a group's own stores would be 2-byte scatters).
#define GH_H16_WARPS 4    // warps per block
#define GH_H16_ROWS 64    // output rows per block
#define GH_H16_BAND 8     // coarse bins the fine histogram covers (a power of 2)
#define GH_H16_LANES 16   // lanes per column

__device__ __forceinline__ int gh_icnt(const unsigned int* h, int b) {
    return (int)((h[b & 63] >> (8 * (b >> 6))) & 0xFFu);
}

// A shared atomic whose result is unused compiles to a fire-and-forget ATOMS.ADD; a decrement only
// meets a counter >= 1, so no borrow crosses into the next byte.
__device__ __forceinline__ void gh_iadd(unsigned int* h, int b, int d) {
    atomicAdd(h + (b & 63), (unsigned int)d << (8 * (b >> 6)));
}

// The group's bits of a warp-wide ballot (bit i = lane i of the group).
__device__ __forceinline__ unsigned int gh_group_ballot(int pred, int lane) {
    const unsigned int b = __ballot_sync(0xFFFFFFFFu, pred);
    return (b >> (lane & 16)) & 0xFFFFu;
}

// Inclusive prefix sum over the 16 lanes of a group (g = the lane's index in it).
__device__ __forceinline__ int gh_group_scan(int v, int g) {
#pragma unroll
    for (int d = 1; d < 16; d <<= 1) {
        const int u = __shfl_up_sync(0xFFFFFFFFu, v, d, 16);
        if (g >= d) v += u;
    }
    return v;
}

// The bin of the k-th smallest (0-based) key counted in h (256 interleaved byte counters, 64 words,
// 16-byte aligned), and below = the keys in lower bins. All 16 lanes of the group call it with the
// same h and k; the k-th key must exist. Every read of h comes before the group's last shuffle, so a
// lane that runs ahead into the next row's updates cannot change what another lane still reads.
__device__ __forceinline__ int gh_select256(const unsigned int* h, int k, int g, int lane, int& below) {
    // Lane g adds words 4g .. 4g + 3 bytewise, and the 4 lanes of its quad q = g / 4 add theirs: byte
    // j of the sum counts bins 64 j + 16 q .. 64 j + 16 q + 15. Lane g's own bins 16 g .. 16 g + 15
    // are byte g / 4 of quad g % 4's sum.
    const uint4 v = reinterpret_cast<const uint4*>(h)[g];
    unsigned int t = v.x + v.y + v.z + v.w;
    t += __shfl_xor_sync(0xFFFFFFFFu, t, 1, 16);
    t += __shfl_xor_sync(0xFFFFFFFFu, t, 2, 16);
    const int s = (int)((__shfl_sync(0xFFFFFFFFu, t, (g & 3) * 4, 16) >> (8 * (g >> 2))) & 0xFFu);
    const int p = gh_group_scan(s, g);
    const int L = __ffs((int)gh_group_ballot(p > k, lane)) - 1;  // the lane whose bins hold it
    const int base = __shfl_sync(0xFFFFFFFFu, p - s, L, 16);
    const int c = gh_icnt(h, 16 * L + g);  // lane g takes bin 16 L + g
    const int q = gh_group_scan(c, g);
    const int j = __ffs((int)gh_group_ballot(base + q > k, lane)) - 1;
    below = base + __shfl_sync(0xFFFFFFFFu, q - c, j, 16);
    return 16 * L + j;
}

__global__ void __launch_bounds__(GH_H16_WARPS * 32)
median_hist16(const unsigned short* __restrict__ src, unsigned short* __restrict__ dst,
              const int* __restrict__ rowmap, const int* __restrict__ colmap, int H, int W,
              unsigned int cval_bits, int size) {
    constexpr int G = GH_H16_LANES, C = GH_H16_WARPS * 32 / G, ROWS = GH_H16_ROWS, B = GH_H16_BAND, MAXR = 7;
    // Words per column: the histograms, plus 16 words of padding. Neighbouring columns see nearly
    // the same keys, so unpadded their groups (two in a warp) would hit the same banks at once.
    constexpr int FW = B * 64, CS = 64 + 16, FS = FW + 16;
    __shared__ unsigned short tile[(ROWS + 2 * MAXR) * (C + 2 * MAXR)];
    __shared__ uint4 coarse_v[C * CS / 4];
    __shared__ uint4 fine_v[C * FS / 4];
    __shared__ unsigned short staged[ROWS * C];
    const int r = size / 2, TH = ROWS + 2 * r, TW = C + 2 * r;
    const int y0 = blockIdx.y * ROWS, x0 = blockIdx.x * C;
    const gh_index zoff = (gh_index)blockIdx.z * (gh_index)H * (gh_index)W;
    gh_load_tile<unsigned short>(tile, TH, TW, src, rowmap, colmap, H, W, r, cval_bits, zoff, y0, x0);
    unsigned int* coarse_all = reinterpret_cast<unsigned int*>(coarse_v);
    for (int i = threadIdx.x; i < C * CS; i += blockDim.x) coarse_all[i] = 0u;
    __syncthreads();
    // Every thread runs to the end (columns past W too, on the tile's filler keys): the warp
    // primitives need all 32 lanes, and the final barrier all threads.
    const int lane = threadIdx.x & 31, g = threadIdx.x & (G - 1), c = threadIdx.x / G;
    unsigned int* coarse = coarse_all + c * CS;
    unsigned int* fine = reinterpret_cast<unsigned int*>(fine_v) + c * FS;
    const unsigned short* col = tile + c;  // key dx of window row j of output i: col[(i + j) * TW + dx]
    const int kth = size * size / 2, rows = min(ROWS, H - y0);
    for (int j = 0; j < size; ++j)
        if (g < size) gh_iadd(coarse, col[j * TW + g] >> 8, 1);
    __syncwarp();
    // The first row's coarse bin by a search; after that, followed.
    int lb;
    int m = gh_select256(coarse, kth, g, lane, lb);
    int F = -2 * B;  // the band's first coarse bin: none yet, so the first row builds it
    for (int i = 0; i < rows; ++i) {
        if (i > 0) {
            int co = 256, cn = 256;  // lane 15 (and lanes >= size): above every bin, in no band
            if (g < size) {
                const unsigned int vo = col[(i - 1) * TW + g], vn = col[(i - 1 + size) * TW + g];
                co = (int)(vo >> 8);
                cn = (int)(vn >> 8);
                gh_iadd(coarse, co, -1);
                gh_iadd(coarse, cn, 1);
                if ((unsigned int)(co - F) < (unsigned int)B) gh_iadd(fine + (co & (B - 1)) * 64, (int)(vo & 255u), -1);
                if ((unsigned int)(cn - F) < (unsigned int)B) gh_iadd(fine + (cn & (B - 1)) * 64, (int)(vn & 255u), 1);
            }
            lb += __popc(gh_group_ballot(cn < m, lane)) - __popc(gh_group_ballot(co < m, lane));
            __syncwarp();
            // m stays in [0, 255]: lb > kth means some key lies below bin m, and the window holds more
            // than kth keys, so the upward walk stops at the last non-empty bin at the latest.
            while (lb > kth) { --m; lb -= gh_icnt(coarse, m); }
            for (;;) { const int cm = gh_icnt(coarse, m); if (lb + cm > kth) break; lb += cm; ++m; }
        }
        const int d = m - F, out = (unsigned int)d >= (unsigned int)B;
        if (__any_sync(0xFFFFFFFFu, out)) {
            // The warp waits out a rebuild when either of its two columns needs one, so the other column
            // rebuilds too if its median is within 2 bins of its band's edge (it would need its own soon).
            const int rebuild = out || d < 2 || d >= B - 2;
            if (rebuild) {
                // Room ahead in the direction the median left by, or is nearest to leaving by (it tends
                // to keep going: a gradient), a little behind it (it also jitters); the first band centred.
                const int behind = F < 0 ? B / 2 - 1 : out ? (m >= F + B ? 1 : B - 2) : (d < B / 2 ? B - 3 : 2);
                F = min(max(m - behind, 0), 256 - B);
                uint4* fv = fine_v + c * (FS / 4);
                for (int q = g; q < FW / 4; q += G) fv[q] = make_uint4(0u, 0u, 0u, 0u);
            }
            __syncwarp();
            if (rebuild) {  // the window row by row, a key per lane
                for (int j = 0; j < size; ++j) {
                    const unsigned int v = g < size ? col[(i + j) * TW + g] : 0u;
                    const int h = (int)(v >> 8);
                    if (g < size && (unsigned int)(h - F) < (unsigned int)B) gh_iadd(fine + (h & (B - 1)) * 64, (int)(v & 255u), 1);
                }
            }
            __syncwarp();
        }
        int fb;
        const int low = gh_select256(fine + (m & (B - 1)) * 64, kth - lb, g, lane, fb);
        if (g == 0) staged[i * C + c] = (unsigned short)((m << 8) | low);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * C; idx += blockDim.x) {
        const int yy = idx / C, xx = idx - yy * C;
        if (x0 + xx < W) dst[zoff + (gh_index)(y0 + yy) * (gh_index)W + (gh_index)(x0 + xx)] = staged[idx];
    }
}

// ---- 3 x 3: sorted row triples -------------------------------------------------------------------
//
// median3<T>: the 3 x 3 median from each window row sorted (lo <= mid <= hi): the median of the
// nine is med3(max of the three lo, med3 of the three mid, min of the three hi) (Paeth; Smith), an
// identity of order statistics, so exact with ties. A thread owns one output column and slides down
// GH_M3_ROWS rows: each padded row's triple is loaded and sorted once and serves three outputs, about
// 14 min/max per output against ~40 for forgetful selection over nine loads. No shared memory: the
// three loads of a row are a warp's consecutive columns (L1 serves the overlap). Blocks of
// GH_M3_COLS x 1 threads, grid (ceil(W / GH_M3_COLS), ceil(H / GH_M3_ROWS), slices); borders through
// rowmap/colmap exactly as the tile loader (padded index p: source rowmap[p], -1 = cval).
#define GH_M3_COLS 128
#define GH_M3_ROWS 16

__device__ __forceinline__ void gh_sort3(unsigned int& a, unsigned int& b, unsigned int& c) {
    gh_sort2(a, b);
    gh_sort2(b, c);
    gh_sort2(a, b);
}

__device__ __forceinline__ unsigned int gh_med3(unsigned int a, unsigned int b, unsigned int c) {
    return gh_max(gh_min(a, b), gh_min(gh_max(a, b), c));
}

template <typename T>
__global__ void __launch_bounds__(GH_M3_COLS)
median3(const T* __restrict__ src, T* __restrict__ dst, const int* __restrict__ rowmap,
        const int* __restrict__ colmap, int H, int W, unsigned int cval_bits) {
    typedef MedianTraits<T> Tr;
    const int x = blockIdx.x * GH_M3_COLS + threadIdx.x;
    const int y0 = blockIdx.y * GH_M3_ROWS;
    if (x >= W) return;
    const gh_index zoff = (gh_index)blockIdx.z * (gh_index)H * (gh_index)W;
    const unsigned int ckey = Tr::key(cval_bits);
    const int c0 = colmap[x], c1 = colmap[x + 1], c2 = colmap[x + 2];
    const int rows = min(GH_M3_ROWS, H - y0);
    unsigned int l0 = 0u, l1 = 0u, m0 = 0u, m1 = 0u, h0 = 0u, h1 = 0u;  // sorted triples of rows p - 2, p - 1
#pragma unroll 1
    for (int i = 0; i < rows + 2; ++i) {
        const int sy = rowmap[y0 + i];
        unsigned int a = ckey, b = ckey, c = ckey;
        if (sy >= 0) {
            const T* r = src + zoff + (gh_index)sy * (gh_index)W;
            if (c0 >= 0) a = Tr::key(Tr::bits_of(r[c0]));
            if (c1 >= 0) b = Tr::key(Tr::bits_of(r[c1]));
            if (c2 >= 0) c = Tr::key(Tr::bits_of(r[c2]));
        }
        gh_sort3(a, b, c);
        if (i >= 2) {
            const unsigned int mx = gh_max(gh_max(l0, l1), a);
            const unsigned int mn = gh_min(gh_min(h0, h1), c);
            const unsigned int md = gh_med3(m0, m1, b);
            dst[zoff + (gh_index)(y0 + i - 2) * (gh_index)W + (gh_index)x] = Tr::value(gh_med3(mx, md, mn));
        }
        l0 = l1; l1 = a;
        m0 = m1; m1 = b;
        h0 = h1; h1 = c;
    }
}

#ifndef __CUDACC_RTC__
// nvcc builds (CI's --cubin check, the host emulator in tests): instantiate everything the
// dispatch can ask for. NVRTC compiles only the name_expressions it is given instead.
#define GH_ARGS(T) const T* __restrict__, T* __restrict__, const int* __restrict__, const int* __restrict__, int, int, unsigned int
template __global__ void median_net<unsigned char, 3>(GH_ARGS(unsigned char));
template __global__ void median_net<unsigned char, 5>(GH_ARGS(unsigned char));
template __global__ void median_net<unsigned short, 3>(GH_ARGS(unsigned short));
template __global__ void median_net<unsigned short, 5>(GH_ARGS(unsigned short));
template __global__ void median_net<float, 3>(GH_ARGS(float));
template __global__ void median_net<float, 5>(GH_ARGS(float));
template __global__ void median_radix<unsigned char>(GH_ARGS(unsigned char), int);
template __global__ void median_radix<unsigned short>(GH_ARGS(unsigned short), int);
template __global__ void median_radix<float>(GH_ARGS(float), int);
template __global__ void median_hist<unsigned char, 0>(GH_ARGS(unsigned char), int);
template __global__ void median_hist<unsigned char, 1>(GH_ARGS(unsigned char), int);
template __global__ void median_hist<unsigned short, 0>(GH_ARGS(unsigned short), int);
template __global__ void median_hist<unsigned short, 1>(GH_ARGS(unsigned short), int);
template __global__ void median3<unsigned char>(GH_ARGS(unsigned char));
template __global__ void median3<unsigned short>(GH_ARGS(unsigned short));
template __global__ void median3<float>(GH_ARGS(float));
#undef GH_ARGS
#endif
