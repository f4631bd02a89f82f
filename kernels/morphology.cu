// Binary closings of 0/1 uint8 masks, equal voxel for voxel to gpuheart.morphology (CPU).
//
// The CPU defines a closing as: edge-pad by the full reach (2h per padded face), scipy dilation then
// erosion with a zero border, crop. Padding by the full reach means the zero border is never seen
// on a padded face, so here a padded face is "read the nearest voxel" (clamp) and an unpadded face
// (a slab halo end, z only) is "zeros outside", both for the input and for the dilated volume the
// erosion reads. No padded copy is ever made.
//
// Integer index math is 64-bit wherever a product of extents appears: a 2048^2 x 600 slab already
// exceeds 2^31 voxels.



// Closing along z with a line of radius R (= iterations * (size // 2): N scipy iterations of a
// radius-h line with a zero border equal one radius-N*h pass on an interval, tested on the CPU).
// One thread per (y, x) column walks z once with two "last seen" indices, so R costs nothing:
//   D(q) = 1  iff some X(s) = 1 with |s - q| <= R      (track the last s with X = 1, reading ahead R)
//   E(p) = 1  iff no D(q) = 0 with |q - p| <= R        (track the last q with D = 0, reading ahead R)
// Consecutive threads own consecutive columns, so every z step is one coalesced row read.
extern "C" __global__ void close_z_line(const unsigned char* __restrict__ in,
                                        unsigned char* __restrict__ out,
                                        int nz, long long plane, int R, int pad_lo, int pad_hi)
{
    long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= plane) return;
    // far enough below every index we compare against (s, q >= -2R) that "never seen" stays false/true
    const int NEVER = -(1 << 30);
    int last_one = NEVER, last_zero = NEVER;
    const unsigned char first = pad_lo ? in[col] : 0;
    const unsigned char last = pad_hi ? in[(long long)(nz - 1) * plane + col] : 0;
    for (int s = -2 * R; s < nz + 2 * R; ++s) {
        unsigned char xs = s < 0 ? first : (s >= nz ? last : in[(long long)s * plane + col]);
        if (xs) last_one = s;
        int q = s - R;  // every X in [q - R, q + R] has been read
        if (q < -R) continue;  // the erosion of any p >= 0 never looks below -R
        bool d = last_one >= q - R;
        // an unpadded face: scipy's zero border holds for the dilated volume too
        if ((q < 0 && !pad_lo) || (q >= nz && !pad_hi)) d = false;
        if (!d) last_zero = q;
        int p = q - R;  // every D in [p - R, p + R] is known
        if (p >= 0 && p < nz) out[(long long)p * plane + col] = (last_zero < p - R) ? 1 : 0;
    }
}

// Closing with a (2h+1)^3 cube, y and x always edge-replicated (the CPU pads them), z padded per
// face. One block closes a TZ x TY x TX tile: the input with a 2h halo is staged in shared memory,
// the dilation is computed on the tile plus an h halo, the erosion on the tile. Shared bytes:
// (TZ+4h)(TY+4h)(TX+4h) + (TZ+2h)(TY+2h)(TX+2h), sized by the caller (cube_shared_bytes in Python);
// h = 1 needs 5.4 KB, h = 5 still fits the 48 KB default, larger cubes go to the CPU.
// The cube is tested directly (up to (2h+1)^3 shared reads, with early exit): for h = 1 that is
// cheaper than three separable passes with their extra synchronisation.
#define CUBE_TZ 4
#define CUBE_TY 8
#define CUBE_TX 32

extern "C" __global__ void close_cube(const unsigned char* __restrict__ in,
                                      unsigned char* __restrict__ out,
                                      int nz, int ny, int nx, int h, int pad_lo, int pad_hi)
{
    extern __shared__ unsigned char smem[];
    const int ez = CUBE_TZ + 4 * h, ey = CUBE_TY + 4 * h, ex = CUBE_TX + 4 * h;
    const int dz = CUBE_TZ + 2 * h, dy = CUBE_TY + 2 * h, dx = CUBE_TX + 2 * h;
    const int w = 2 * h + 1;
    unsigned char* sX = smem;
    unsigned char* sD = smem + ez * ey * ex;
    const int z0 = blockIdx.z * CUBE_TZ, y0 = blockIdx.y * CUBE_TY, x0 = blockIdx.x * CUBE_TX;
    const int tid = threadIdx.x, nt = blockDim.x;

    for (int i = tid; i < ez * ey * ex; i += nt) {
        int lx = i % ex, t = i / ex, ly = t % ey, lz = t / ey;
        int gz = z0 - 2 * h + lz;
        int gy = min(max(y0 - 2 * h + ly, 0), ny - 1);
        int gx = min(max(x0 - 2 * h + lx, 0), nx - 1);
        unsigned char v;
        if (gz < 0) v = pad_lo ? in[(long long)gy * nx + gx] : 0;
        else if (gz >= nz) v = pad_hi ? in[((long long)(nz - 1) * ny + gy) * nx + gx] : 0;
        else v = in[((long long)gz * ny + gy) * nx + gx];
        sX[i] = v;
    }
    __syncthreads();

    for (int i = tid; i < dz * dy * dx; i += nt) {
        int lx = i % dx, t = i / dx, ly = t % dy, lz = t / dy;
        int gz = z0 - h + lz;
        unsigned char d = 0;
        // beyond an unpadded z face the dilated volume is scipy's zero border
        if (!((gz < 0 && !pad_lo) || (gz >= nz && !pad_hi))) {
            for (int a = 0; a < w && !d; ++a)
                for (int b = 0; b < w && !d; ++b) {
                    const unsigned char* row = sX + ((lz + a) * ey + (ly + b)) * ex + lx;
                    for (int c = 0; c < w; ++c)
                        if (row[c]) { d = 1; break; }
                }
        }
        sD[i] = d;
    }
    __syncthreads();

    for (int i = tid; i < CUBE_TZ * CUBE_TY * CUBE_TX; i += nt) {
        int lx = i % CUBE_TX, t = i / CUBE_TX, ly = t % CUBE_TY, lz = t / CUBE_TY;
        int gz = z0 + lz, gy = y0 + ly, gx = x0 + lx;
        if (gz >= nz || gy >= ny || gx >= nx) continue;
        unsigned char e = 1;
        for (int a = 0; a < w && e; ++a)
            for (int b = 0; b < w && e; ++b) {
                const unsigned char* row = sD + ((lz + a) * dy + (ly + b)) * dx + lx;
                for (int c = 0; c < w; ++c)
                    if (!row[c]) { e = 0; break; }
            }
        out[((long long)gz * ny + gy) * nx + gx] = e;
    }
}
