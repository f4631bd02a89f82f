"""Run kernels/*.cu on the host, so the CUDA dispatch code can be tested without a GPU.

The kernel source is compiled as C++ (g++) with a prelude that stands in for the CUDA runtime. Its
only edit: shared arrays (``__shared__ T a[n]`` and ``extern __shared__ T a[]``) are taken from
per-launch buffers that are refilled with garbage at every block start, as a device leaves them.
Each block's threads are OS threads meeting at a real barrier (``__syncthreads``); blocks run one
after another in a shuffled order; ``atomicAdd`` is a real atomic; ``__shfl_down_sync`` exchanges
through a block-wide slot array between two barriers (so, as on a GPU, every thread of the block
must call it); the other warp primitives (``__shfl_sync``, ``__shfl_up_sync``, ``__shfl_xor_sync``, ``__ballot_sync``,
``__any_sync``, ``__syncwarp``) meet at a barrier of the warp's own threads instead, so every lane of
the warp must call them; the ``__f*_rn`` / ``__d*_rn`` intrinsics are plain IEEE operations
(``-ffp-contract=off``: no FMA contraction, as NVRTC with ``--fmad=false``).

One ``extern "C"`` wrapper per kernel (an ``extern "C"`` name or a template instantiation) unpacks a
``void**`` argument array into the kernel's own parameter types, and a second reports their sizes: a
launch whose arguments do not match (an ``np.int64`` for an ``int``, an int64 array for ``const int*``,
a Python scalar, a missing argument) fails here, as it would misbehave on a device. Array arguments
sit between guard zones, so a store outside them fails too; so do launches beyond CUDA's limits.

``fake_cupy()`` is NumPy posing as CuPy for the dispatch functions (``import cupy as cp`` inside them);
``EmulatedModule`` stands in for ``backend.load_module``'s ``cupy.RawModule``.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import threading
import types
from pathlib import Path

import numpy as np

from gpuheart.backend import kernel_source

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <utility>
#include <vector>
#include <memory>
#include <type_traits>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
inline unsigned blockThreads() { return blockDim.x * blockDim.y * blockDim.z; }
inline unsigned flatThread() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }
static std::barrier<>* gh_barrier;
static std::vector<unsigned char> gh_dynamic_shared;
static std::vector<unsigned char> gh_static_shared(1 << 18);
thread_local std::size_t gh_static_used;  // every thread allocates the same arrays in the same order
static std::size_t gh_static_peak;
static std::vector<unsigned long long> gh_slots;
// A kernel's `__shared__ T name[n];` (rewritten by cuda_emulator._host_source): the block's
// arrays, poisoned at every block start as a device leaves them holding garbage.
template <class T> T* gh_shared(std::size_t n) {
    const std::size_t at = (gh_static_used + 15) & ~std::size_t(15);
    gh_static_used = at + n * sizeof(T);
    if (gh_static_used > gh_static_shared.size()) { std::fprintf(stderr, "static shared arena overflow\n"); std::abort(); }
    if (flatThread() == 0 && gh_static_used > gh_static_peak) gh_static_peak = gh_static_used;
    return reinterpret_cast<T*>(gh_static_shared.data() + at);
}
inline void __syncthreads() { gh_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __restrict__
using std::min; using std::max; using std::asinh; using std::rintf; using std::fminf; using std::fmaxf;
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __double2float_rn(double v) { return (float)v; }
inline float __int2float_rn(int v) { return (float)v; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline long long __double_as_longlong(double d) { long long u; std::memcpy(&u, &d, 8); return u; }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
template <class T> inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> T __shfl_down_sync(unsigned, T v, int delta) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    const unsigned t = flatThread(), lane = t & 31u;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    gh_slots[t] = bits;
    gh_barrier->arrive_and_wait();
    T r = v;
    if (lane + (unsigned)delta < 32u && t + (unsigned)delta < blockThreads())
        std::memcpy(&r, &gh_slots[t + delta], sizeof(T));
    gh_barrier->arrive_and_wait();
    return r;
}
// Warp primitives: the warp's threads meet at the warp's own barrier (every lane of the warp must
// call, with the full mask, as the kernels do), exchanging values through a per-thread slot array.
// A sense-reversing barrier that yields while it waits: a warp crosses one several times per row of
// some kernels, and std::barrier, which puts its waiters to sleep, made those launches about 20 % slower.
struct GhWarpBarrier {
    std::atomic<unsigned> arrived{0}, phase{0};
    unsigned size = 32;
    void arrive_and_wait() {
        const unsigned ph = phase.load(std::memory_order_acquire);
        if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == size) {
            arrived.store(0, std::memory_order_relaxed);
            phase.store(ph + 1, std::memory_order_release);
        } else {
            while (phase.load(std::memory_order_acquire) == ph) std::this_thread::yield();
        }
    }
};
static std::vector<std::unique_ptr<GhWarpBarrier>> gh_warp_barriers;
static std::vector<unsigned long long> gh_wslots;
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { gh_warp_barriers[flatThread() / 32]->arrive_and_wait(); }
template <class T> T gh_warp_read(T v, long src) {  // v of thread src of this warp (own v if none)
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    const unsigned t = flatThread();
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    gh_wslots[t] = bits;
    __syncwarp();
    T r = v;
    if (src >= 0 && src < (long)blockThreads() && src / 32 == (long)t / 32) std::memcpy(&r, &gh_wslots[src], sizeof(T));
    __syncwarp();
    return r;
}
template <class T> T __shfl_sync(unsigned, T v, int src, int width = 32) {
    const unsigned t = flatThread(), lane = t & 31u;
    return gh_warp_read(v, (long)(t - lane + (lane / width) * width + ((unsigned)src % width)));
}
template <class T> T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    const unsigned t = flatThread(), lane = t & 31u, src = lane ^ (unsigned)mask;
    return gh_warp_read(v, src / width == lane / width ? (long)(t - lane + src) : -1L);
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    const unsigned t = flatThread(), lane = t & 31u;
    return gh_warp_read(v, (lane % width) >= delta ? (long)(t - delta) : -1L);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    const unsigned t = flatThread(), base = t & ~31u;
    gh_wslots[t] = pred ? 1u : 0u;
    __syncwarp();
    unsigned b = 0;
    for (unsigned l = 0; l < 32 && base + l < blockThreads(); ++l) b |= (unsigned)gh_wslots[base + l] << l;
    __syncwarp();
    return b;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0u; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
#include "KERNEL_SOURCE"

constexpr std::size_t GH_GUARD = 4096;       // bytes past the dynamic shared memory, checked after
constexpr std::size_t GH_SHARED_LIMIT = 48 * 1024;  // static + dynamic per block, without opt-in

// 0 = ok; 1 = a write past the dynamic shared memory; 2 = static + dynamic shared memory over the
// 48 KiB a block gets without an opt-in attribute.
template <class F> int gh_launch(dim3 grid, dim3 block, unsigned long long shmem, F body) {
    blockDim = block; gridDim = grid;
    const unsigned n = block.x * block.y * block.z;
    std::barrier<> bar(n); gh_barrier = &bar;
    gh_dynamic_shared.assign(shmem + GH_GUARD, 0xCD);
    gh_static_peak = 0;
    gh_slots.assign(n, 0);
    gh_wslots.assign(n, 0);
    gh_warp_barriers.clear();
    for (unsigned w0 = 0; w0 < n; w0 += 32) {
        gh_warp_barriers.emplace_back(new GhWarpBarrier);
        gh_warp_barriers.back()->size = std::min(32u, n - w0);
    }
    // blocks in a shuffled order: a kernel must not rely on one block running before another
    std::vector<dim3> order;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) order.push_back(dim3{bx, by, bz});
    std::shuffle(order.begin(), order.end(), std::mt19937(order.size()));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < n; ++t)
        ts.emplace_back([&, t] {
            threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (const dim3& b : order) {
                blockIdx = b;
                gh_static_used = 0;
                if (t == 0) {  // garbage, as a device leaves it
                    std::memset(gh_static_shared.data(), 0xCD, gh_static_shared.size());
                    std::memset(gh_dynamic_shared.data(), 0xCD, shmem);
                }
                bar.arrive_and_wait();
                body();
                bar.arrive_and_wait();  // the next block must not refill shared memory early
            }
        });
    for (auto& t : ts) t.join();
    for (std::size_t i = shmem; i < gh_dynamic_shared.size(); ++i)
        if (gh_dynamic_shared[i] != 0xCD) return 1;
    return gh_static_peak + shmem > GH_SHARED_LIMIT ? 2 : 0;
}

template <class... A, std::size_t... I>
void gh_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
// Per parameter: sizeof for a value, minus the pointee's size for a pointer.
template <class A> constexpr int gh_param_size() {
    if constexpr (std::is_pointer_v<A>) return -(int)sizeof(std::remove_pointer_t<A>);
    else return (int)sizeof(A);
}
template <class... A>
int gh_sizes(void (*)(A...), int* out) {
    int i = 0;
    ((out[i++] = gh_param_size<A>()), ...);
    return (int)sizeof...(A);
}
"""

# One launcher and one size report per kernel; gh_apply deduces the parameter types from the kernel.
EXPORT = r"""
extern "C" int gh_sizes_{sym}(int* out) {{ return gh_sizes(&{name}, out); }}
extern "C" int gh_run_{sym}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned long long shmem, void** args) {{
    return gh_launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, shmem, [&] {{ gh_apply(&{name}, args); }});
}}
"""


def _symbol(name: str) -> str:
    """A C identifier for a kernel name expression (``median_net<unsigned char, 3>`` included)."""
    return re.sub(r"\W", "_", name)

APPLY = r"""
template <class... A> void gh_apply(void (*k)(A...), void** args) {
    gh_call(k, args, std::index_sequence_for<A...>{});
}
"""

LAUNCH_TIMEOUT_S = 300
GUARD_BYTES = 4096  # around every array argument: a kernel writing outside its arrays is caught
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([\w\s:]+?)\s+(\w+)\s*\[([^\]]+)\]\s*;")


def _host_source(cu: str) -> str:
    """The kernel source with its shared arrays taken from the emulator's per-block buffers:
    ``extern __shared__ T name[];`` points at the launch's dynamic shared memory, ``__shared__ T
    name[n];`` at an arena that is poisoned at each block start (a ``static`` array would keep the
    previous block's values, or start as zeros, where a device gives garbage)."""
    text = kernel_source(cu)
    text = _DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ({m.group(1)}*)gh_dynamic_shared.data();", text)
    return _STATIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = gh_shared<{m.group(1)}>({m.group(3)});", text)


def available() -> bool:
    return shutil.which("g++") is not None


def build(cu: str, names: list[str], workdir: Path) -> "EmulatedModule":
    """Compile ``kernels/<cu>`` for the host with a launcher for each kernel in ``names``: ``extern "C"``
    names, or template name expressions as NVRTC takes them (``median_hist<unsigned char, 1>``)."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise RuntimeError("g++ is not on PATH")
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"host_{cu}.cpp"
    (workdir / f"host_{cu}").write_text(_host_source(cu))
    body = PRELUDE.replace("KERNEL_SOURCE", f"host_{cu}") + APPLY + "".join(EXPORT.format(name=n, sym=_symbol(n)) for n in names)
    src.write_text(body)
    lib = workdir / f"host_{cu}.so"
    res = subprocess.run([gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-ffp-contract=off",
                          f"-I{workdir}", "-o", str(lib), str(src)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"host build of {cu} failed:\n{res.stderr[-4000:]}")
    return EmulatedModule(ctypes.CDLL(str(lib)), names)


_CTYPES = {np.dtype(np.int8): ctypes.c_int8, np.dtype(np.uint8): ctypes.c_uint8,
           np.dtype(np.int16): ctypes.c_int16, np.dtype(np.uint16): ctypes.c_uint16,
           np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
           np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
           np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


class EmulatedKernel:
    """``kern(grid, block, args, shared_mem=0)`` as a ``cupy.RawKernel``; records its launches."""

    def __init__(self, lib, name: str, launches: list):
        self.name, self.launches, self._lib = name, launches, lib
        self._run = getattr(lib, f"gh_run_{_symbol(name)}")
        sizes = (ctypes.c_int * 64)()
        n = getattr(lib, f"gh_sizes_{_symbol(name)}")(sizes)
        self.param_sizes = list(sizes[:n])

    def __call__(self, grid, block, args, shared_mem=0):
        if id(self._lib) in _BROKEN:
            raise RuntimeError(f"{self.name}: an earlier launch of this host build hung; it cannot be used again")
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if np.prod(block) > 1024 or min(grid + block) < 1 or max(grid[1:]) > 65535 or grid[0] >= 2**31:
            raise ValueError(f"{self.name}: launch grid {grid} / block {block} outside CUDA's limits")
        if len(args) != len(self.param_sizes):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.param_sizes)} parameters")
        keep, ptrs, guarded = [], (ctypes.c_void_p * len(args))(), []
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        for i, (a, size) in enumerate(zip(args, self.param_sizes)):
            if size < 0:  # a pointer parameter: an array of the pointee's width
                if not isinstance(a, np.ndarray) or a.itemsize != -size:
                    raise TypeError(f"{self.name}: argument {i} must be an array of {-size}-byte items, got "
                                    f"{getattr(a, 'dtype', type(a).__name__)}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {i} is not C-contiguous")
                if any(b is not a and np.shares_memory(a, b) for b in arrays):
                    c = ctypes.c_void_p(a.ctypes.data)  # aliased: the kernel must see the one buffer
                else:  # a copy between guard zones, checked and copied back after the launch
                    buf = np.full(a.nbytes + 2 * GUARD_BYTES, 0xCD, np.uint8)
                    buf[GUARD_BYTES:GUARD_BYTES + a.nbytes] = a.reshape(-1).view(np.uint8)
                    guarded.append((i, a, buf))
                    c = ctypes.c_void_p(buf.ctypes.data + GUARD_BYTES)
            else:  # a value: a NumPy scalar of the parameter's width (CuPy would guess one for a Python scalar)
                if not isinstance(a, np.generic) or a.dtype not in _CTYPES or a.dtype.itemsize != size:
                    raise TypeError(f"{self.name}: argument {i} must be a {size}-byte NumPy scalar, got "
                                    f"{getattr(a, 'dtype', type(a).__name__)}")
                c = _CTYPES[a.dtype](a.item())
            keep.append(c)
            ptrs[i] = ctypes.cast(ctypes.pointer(c), ctypes.c_void_p)
        self.launches.append((self.name, grid, block, int(shared_mem)))
        # A barrier that some thread never reaches would hang the launch: run it aside and give up
        # after a while (the stuck native threads die with the test process; their arguments are kept).
        result = []
        call = threading.Thread(target=lambda: result.append(self._run(
            *(ctypes.c_uint(v) for v in grid + block), ctypes.c_ulonglong(int(shared_mem)), ptrs)), daemon=True)
        with _LAUNCH_LOCK:   # a host build keeps its barrier and shared arenas in globals: one launch at a time
            call.start()
            call.join(LAUNCH_TIMEOUT_S)
        if call.is_alive():
            # its threads still run and hold the build's globals (barrier, shared arenas): no more launches
            _BROKEN.add(id(self._lib))
            _STUCK.append((keep, ptrs, args, guarded))   # the guarded copies too: the kernel still writes them
            raise TimeoutError(f"{self.name} did not finish in {LAUNCH_TIMEOUT_S} s on the emulator "
                               "(a __syncthreads that not every thread of a block reaches?)")
        if result[0] == 1:
            raise RuntimeError(f"{self.name} wrote past its {shared_mem} bytes of dynamic shared memory")
        if result[0] == 2:
            raise RuntimeError(f"{self.name} uses more than 48 KiB of shared memory per block")
        for i, a, buf in guarded:
            if (buf[:GUARD_BYTES] != 0xCD).any() or (buf[GUARD_BYTES + a.nbytes:] != 0xCD).any():
                raise RuntimeError(f"{self.name} wrote outside argument {i} ({a.dtype} array of {a.shape})")
            if a.flags.writeable:
                a.reshape(-1).view(np.uint8)[:] = buf[GUARD_BYTES:GUARD_BYTES + a.nbytes]


_STUCK: list = []
_LAUNCH_LOCK = threading.Lock()
_BROKEN: set = set()


class EmulatedModule:
    """Stands in for the ``cupy.RawModule`` of one kernels/*.cu file."""

    def __init__(self, lib, names):
        self.lib, self.names, self.launches = lib, set(names), []

    def get_function(self, name: str) -> EmulatedKernel:
        if name not in self.names:
            raise KeyError(f"{name} was not exported by the emulator build (have {sorted(self.names)})")
        return EmulatedKernel(self.lib, name, self.launches)


def fake_cupy() -> types.ModuleType:
    """NumPy posing as CuPy: what the dispatch functions call as ``cp.*``."""
    mod = types.ModuleType("cupy")
    mod.__getattr__ = lambda name: getattr(np, name)
    mod.asnumpy = np.asarray
    mod.is_available = lambda: True

    def empty(shape, dtype=float, order="C"):  # garbage, as a device allocation holds
        a = np.empty(shape, dtype, order)
        a.reshape(-1).view(np.uint8)[:] = 0xCD
        return a

    mod.empty = empty
    return mod
