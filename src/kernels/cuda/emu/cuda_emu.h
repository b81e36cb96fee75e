// A host-side CUDA emulator: enough of the CUDA C++ device language to compile ferrotune's
// kernel sources (src/kernels/cuda/*.cu) UNMODIFIED with a host C++17 compiler and to run
// them on the CPU, so that the GPU backend can be tested on machines without a GPU:
//
//     g++ -std=c++17 -O2 -DFT_EMU -include src/kernels/cuda/emu/cuda_emu.h -x c++ norm.cu
//
// plus src/kernels/cuda/emu/cuda_emu.cpp (the runtime: fibers, barriers, warp exchange).
//
// Execution model. A launch runs the grid's blocks one after another on the calling OS
// thread. The threads of a block are cooperative fibers with their own stacks; a fiber runs
// until it reaches a barrier (__syncthreads, __syncwarp, a shuffle, a vote) or exits. Blocks
// with an even linear index run their fibers in thread order, odd ones in reverse order, so
// that a read of another thread's write without a barrier between them breaks one way or
// the other. Several OS threads may launch at once: launches are serialised by one lock
// (the kernels' __shared__ arrays are process-wide statics), the fibers' state is
// thread_local.
//
// What is emulated, and how:
//   * qualifiers: __global__ (always-inlined: no symbol of its own), __device__, __host__,
//     __forceinline__, __align__(n), __launch_bounds__(...), __restrict__ (not __noinline__:
//     libstdc++ spells its own attribute that way);
//   * threadIdx / blockIdx / blockDim / gridDim (per fiber), warpSize;
//   * __shared__ = `static`: a block-scope __shared__ variable is shared by the fibers of the
//     block that runs (blocks run one after another, launches one at a time). Not
//     `thread_local`: the kernels' shared arrays add up to ~0.5 MB, which a shared library
//     loaded by dlopen (the Python extension) cannot get as static TLS. It is NOT cleared
//     between blocks (on a GPU its content is undefined at block start anyway);
//   * dynamic shared memory: `extern __shared__ T name[]` cannot be bound to the launch's
//     buffer by a host compiler (the name is the kernel's), so kernels declare it with
//     FT_DYN_SMEM(T, name) (defined here and, for NVRTC, in ../common.cuh); it is filled with
//     0xFF (NaNs) at every block start and guarded by a canary after the requested size;
//   * __syncthreads, __syncwarp, __shfl_sync / _xor / _up / _down (any trivially copyable
//     type of <= 16 bytes, width 2..32), __all_sync / __any_sync / __ballot_sync;
//   * atomics (atomicAdd for int, unsigned, unsigned long long, float, double; atomicMax,
//     atomicMin for int; atomicCAS, atomicExch) as real host atomics;
//   * __half and __nv_bfloat16 (round to nearest even, NaN/inf/subnormals exact) with the
//     conversion intrinsics and float arithmetic operators;
//   * math: the C library's (expf, logf, sqrtf, sinf, cosf, sincosf, fmaxf, INFINITY, ...)
//     plus __expf, __logf, __fdividef, rsqrtf, __saturatef, bit casts, __popc, __clz, ...;
//     the fast intrinsics are the precise functions here (no GPU approximation error);
//   * nvcuda::wmma, 16x16x16 with __half / __nv_bfloat16 inputs and float (or __half)
//     accumulators: every lane's fragment holds the WHOLE tile (num_elements = 256), stored
//     in a scrambled element order, so kernels that depend on the (unspecified) fragment
//     layout fail here as they would on some GPU. load/store check the 256-bit pointer
//     alignment and the ldm multiple that the API demands.
//
// Checked at run time, with a message and abort(): a __syncthreads that not every thread of
// the block reaches (some exited), warp barriers whose lanes exited or that mix masks or
// operations, a deadlock, a thread configuration out of range, dynamic shared memory above
// 48 KB or written past the launch's request, __trap(), nested launches.
//
// FT_EXPORT(name, Params) (used after every kernel) defines the host entry points
//     extern "C" void ft_emu_<name>(unsigned gx, unsigned gy, unsigned gz,
//                                   unsigned bx, unsigned by, unsigned bz,
//                                   unsigned smem_bytes, const void* params);
//     extern "C" unsigned long long ft_emu_sizeof_<name>(void);   // sizeof(Params)
// The library exports no other global symbols than ft_emu_* (helpers are static, inline or
// in anonymous namespaces).
//
// Building (as scripts/test_kernels_emu.sh does, and the Rust build script should): every
// src/kernels/cuda/*.cu and emu/cuda_emu.cpp, all with the same flags
//     -std=c++17 -DFT_EMU -include <...>/emu/cuda_emu.h -x c++      (and -pthread)
// into one static library, linked with the C++ standard library. Fibers switch through a
// few lines of assembly on x86-64 and through ucontext elsewhere (or with -DFT_EMU_UCONTEXT).
// Stack size per fiber: FT_EMU_STACK_KB (default 512; the tensor-core attention kernels hold
// whole 16x16 fragments per lane: tens of KB).
#pragma once

#ifndef FT_EMU
#define FT_EMU 1
#endif

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <type_traits>

// ---------------------------------------------------------------------------------------
// Qualifiers
#define __global__ inline __attribute__((always_inline))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static
#define __constant__ static const
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ---------------------------------------------------------------------------------------
// Built-in vector types used for the launch geometry
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---------------------------------------------------------------------------------------
// The runtime (cuda_emu.cpp)
struct ft_emu_thread_view {
    uint3 tid;   // threadIdx
    uint3 bid;   // blockIdx
    dim3 bdim;   // blockDim
    dim3 gdim;   // gridDim
};

enum ft_emu_warp_op { FT_EMU_SYNCWARP = 1, FT_EMU_SHFL = 2, FT_EMU_VOTE = 3 };

extern "C" {
// The calling fiber's geometry. `const`: for one fiber the answer never changes, so the
// compiler may reuse it within a kernel invocation (each fiber has its own invocation).
const ft_emu_thread_view* ft_emu_rt_view(void) __attribute__((const));
void ft_emu_rt_syncthreads(void);
// A warp barrier over `mask`; for FT_EMU_SHFL every lane gives `size` bytes at `in` and
// receives lane `src`'s bytes at `out` (src < 0: its own); for FT_EMU_VOTE `*(unsigned*)out`
// receives the ballot of the lanes' `*(const int*)in != 0`.
void ft_emu_rt_warp(int op, unsigned mask, const void* in, unsigned size, int src, void* out);
void* ft_emu_rt_dyn_smem(void);
// Memo of one warp's redundant computations (every lane computes the same WMMA product): the
// calling lane's n-th lookup finds what a lane of its warp stored for its own n-th call with
// the very same input bytes (returns 1 and copies the result to out), else returns 0 and the
// caller computes, then stores with ft_emu_rt_memo_put.
int ft_emu_rt_memo_get(const void* in1, unsigned n1, const void* in2, unsigned n2, const void* in3,
                       unsigned n3, void* out, unsigned n_out);
void ft_emu_rt_memo_put(const void* in1, unsigned n1, const void* in2, unsigned n2, const void* in3,
                        unsigned n3, const void* out, unsigned n_out);
__attribute__((noreturn, format(printf, 1, 2))) void ft_emu_rt_fail(const char* fmt, ...);
void ft_emu_rt_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                      unsigned by, unsigned bz, unsigned smem_bytes,
                      void (*body)(const void*), const void* params);
}

#define threadIdx (ft_emu_rt_view()->tid)
#define blockIdx (ft_emu_rt_view()->bid)
#define blockDim (ft_emu_rt_view()->bdim)
#define gridDim (ft_emu_rt_view()->gdim)
#define warpSize 32

#define FT_DYN_SMEM(T, name) T* name = static_cast<T*>(ft_emu_rt_dyn_smem())

#define FT_EXPORT(name, Params)                                                              \
    extern "C" void ft_emu_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx,      \
                                  unsigned by, unsigned bz, unsigned smem_bytes,           \
                                  const void* params) {                                    \
        Params ft_p;                                                                       \
        std::memcpy(static_cast<void*>(&ft_p), params, sizeof(Params));                    \
        ft_emu_rt_launch(#name, gx, gy, gz, bx, by, bz, smem_bytes,                        \
                         [](const void* pp) { name(*static_cast<const Params*>(pp)); },    \
                         &ft_p);                                                           \
    }                                                                                      \
    extern "C" unsigned long long ft_emu_sizeof_##name(void) { return sizeof(Params); }

// ---------------------------------------------------------------------------------------
// Synchronisation, warp exchange, votes
static inline void __syncthreads() { ft_emu_rt_syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ft_emu_rt_warp(FT_EMU_SYNCWARP, mask, nullptr, 0, -1, nullptr);
}
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] static inline void __trap() { ft_emu_rt_fail("__trap() called"); }

namespace ft_emu_detail {
static inline unsigned lane() {
    const ft_emu_thread_view* v = ft_emu_rt_view();
    const unsigned linear = v->tid.x + v->bdim.x * (v->tid.y + v->bdim.y * v->tid.z);
    return linear % 32u;
}
template <class T>
static inline T exchange(unsigned mask, T var, int src) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16,
                  "the emulator shuffles trivially copyable types of at most 16 bytes");
    T out;
    ft_emu_rt_warp(FT_EMU_SHFL, mask, &var, sizeof(T), src, &out);
    return out;
}
static inline void check_width(int width) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        ft_emu_rt_fail("shuffle width %d is not a power of two in 1..32", width);
}
}  // namespace ft_emu_detail

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    ft_emu_detail::check_width(width);
    const int l = (int)ft_emu_detail::lane();
    const int src = (l & ~(width - 1)) + (srcLane & (width - 1));
    return ft_emu_detail::exchange(mask, var, src);
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    ft_emu_detail::check_width(width);
    const int l = (int)ft_emu_detail::lane();
    int src = l ^ laneMask;
    if ((src & ~(width - 1)) > (l & ~(width - 1))) src = -1;  // a later group: own value
    return ft_emu_detail::exchange(mask, var, src);
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    ft_emu_detail::check_width(width);
    const int l = (int)ft_emu_detail::lane();
    int src = l + (int)delta;
    if ((src & ~(width - 1)) != (l & ~(width - 1))) src = -1;
    return ft_emu_detail::exchange(mask, var, src);
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    ft_emu_detail::check_width(width);
    const int l = (int)ft_emu_detail::lane();
    int src = l - (int)delta;
    if (src < 0 || (src & ~(width - 1)) != (l & ~(width - 1))) src = -1;
    return ft_emu_detail::exchange(mask, var, src);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned out = 0;
    ft_emu_rt_warp(FT_EMU_VOTE, mask, &pred, sizeof(int), -1, &out);
    return out;
}
static inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
static inline unsigned __activemask() { return 0xffffffffu; }

// ---------------------------------------------------------------------------------------
// Atomics (real ones: several host threads may launch kernels at once)
static inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* a, unsigned v) {
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
template <class F>
static inline F ft_emu_atomic_fadd(F* a, F v) {
    F old, want;
    __atomic_load(a, &old, __ATOMIC_SEQ_CST);
    do {
        want = old + v;
    } while (!__atomic_compare_exchange(a, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
}
static inline float atomicAdd(float* a, float v) { return ft_emu_atomic_fadd(a, v); }
static inline double atomicAdd(double* a, double v) { return ft_emu_atomic_fadd(a, v); }
static inline int atomicMax(int* a, int v) {
    int old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline int atomicMin(int* a, int v) {
    int old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (old > v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicExch(unsigned* a, unsigned v) {
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);
}
static inline int atomicCAS(int* a, int cmp, int v) {
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
static inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long cmp,
                                           unsigned long long v) {
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}

// ---------------------------------------------------------------------------------------
// Math beyond the C library
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
static inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
static inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }
static inline long long __double_as_longlong(double f) { long long i; std::memcpy(&i, &f, 8); return i; }
// The C library declares functions of these names itself (its internal aliases), hence
// function-like macros; the standard headers above are all included already.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __powf(x, y) powf(x, y)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
// function-like macros: newer C libraries may declare rsqrt/rsqrtf themselves (C23)
#define rsqrtf(x) (1.0f / sqrtf(x))
#define rsqrt(x) (1.0 / sqrt(x))
static inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
template <class T>
static inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------------------
// __half and __nv_bfloat16: storage types with round-to-nearest-even conversions
namespace ft_emu_detail {
static inline unsigned short f32_to_f16_bits(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    const unsigned sign = (x >> 16) & 0x8000u;
    const unsigned ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf or NaN (NaN -> the canonical 0x7fff, as CUDA)
        return (unsigned short)(ax > 0x7f800000u ? 0x7fffu : (sign | 0x7c00u));
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf
    if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
        const unsigned e = ax >> 23;
        if (e < 102) return (unsigned short)sign;  // < 2^-25: rounds to zero
        const unsigned mant = (ax & 0x7fffffu) | 0x800000u;
        const unsigned shift = 126 - e;  // 14 .. 24
        unsigned h = mant >> shift;
        const unsigned rem = mant & ((1u << shift) - 1);
        const unsigned halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1))) ++h;
        return (unsigned short)(sign | h);
    }
    const unsigned r = ax - 0x38000000u;  // rebias 127 -> 15
    unsigned h = r >> 13;
    const unsigned rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
    return (unsigned short)(sign | h);
}
static inline float f16_bits_to_f32(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned e = (h >> 10) & 0x1fu;
    const unsigned m = h & 0x3ffu;
    unsigned x;
    if (e == 0) {
        const float v = (float)m * 0x1p-24f;  // exact
        return sign ? -v : v;
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
static inline unsigned short f32_to_bf16_bits(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical, as CUDA
    x += 0x7fffu + ((x >> 16) & 1u);
    return (unsigned short)(x >> 16);
}
static inline float bf16_bits_to_f32(unsigned short b) {
    const unsigned x = (unsigned)b << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
}  // namespace ft_emu_detail

struct __half_raw {
    unsigned short x;
};
struct __nv_bfloat16_raw {
    unsigned short x;
};

namespace {
struct __half {
    unsigned short __x;
    __half() = default;
    __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(ft_emu_detail::f32_to_f16_bits(f)) {}
    __half(double f) : __x(ft_emu_detail::f32_to_f16_bits((float)f)) {}
    __half(int i) : __x(ft_emu_detail::f32_to_f16_bits((float)i)) {}
    operator float() const { return ft_emu_detail::f16_bits_to_f32(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
};
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(ft_emu_detail::f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(ft_emu_detail::f32_to_bf16_bits((float)f)) {}
    __nv_bfloat16(int i) : __x(ft_emu_detail::f32_to_bf16_bits((float)i)) {}
    operator float() const { return ft_emu_detail::bf16_bits_to_f32(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return (float)h; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }

// Arithmetic as the sm_53+/sm_80+ operators: f32 operation, one rounding to the type.
#define FT_EMU_HALF_OPS(H)                                                                   \
    inline H operator+(H a, H b) { return H((float)a + (float)b); }                         \
    inline H operator-(H a, H b) { return H((float)a - (float)b); }                         \
    inline H operator*(H a, H b) { return H((float)a * (float)b); }                         \
    inline H operator/(H a, H b) { return H((float)a / (float)b); }                         \
    inline H operator-(H a) { H r = a; r.__x ^= 0x8000u; return r; }                         \
    inline H& operator+=(H& a, H b) { return a = a + b; }                                   \
    inline H& operator-=(H& a, H b) { return a = a - b; }                                   \
    inline H& operator*=(H& a, H b) { return a = a * b; }                                   \
    inline bool operator==(H a, H b) { return (float)a == (float)b; }                       \
    inline bool operator!=(H a, H b) { return (float)a != (float)b; }                       \
    inline bool operator<(H a, H b) { return (float)a < (float)b; }                         \
    inline bool operator>(H a, H b) { return (float)a > (float)b; }                         \
    inline bool operator<=(H a, H b) { return (float)a <= (float)b; }                       \
    inline bool operator>=(H a, H b) { return (float)a >= (float)b; }
FT_EMU_HALF_OPS(__half)
FT_EMU_HALF_OPS(__nv_bfloat16)
#undef FT_EMU_HALF_OPS
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
inline bool __hisnan(__nv_bfloat16 a) { return (a.__x & 0x7fffu) > 0x7f80u; }
}  // namespace

// ---------------------------------------------------------------------------------------
// nvcuda::wmma, 16x16x16
namespace nvcuda {
namespace {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct ft_shape;
template <int M, int N, int K>
struct ft_shape<matrix_a, M, N, K> { enum { rows = M, cols = K }; };
template <int M, int N, int K>
struct ft_shape<matrix_b, M, N, K> { enum { rows = K, cols = N }; };
template <int M, int N, int K>
struct ft_shape<accumulator, M, N, K> { enum { rows = M, cols = N }; };

// Element (r, c) of the tile lives at x[ft_slot(r * cols + c)]: a fixed scrambled order.
constexpr int ft_slot(int i) { return (i * 97 + 31) & 255; }

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
    static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value ||
                      std::is_same<T, float>::value,
                  "the emulator has __half, __nv_bfloat16 and float fragments");

  public:
    enum { num_elements = ft_shape<Use, M, N, K>::rows * ft_shape<Use, M, N, K>::cols };
    enum { ft_rows = ft_shape<Use, M, N, K>::rows, ft_cols = ft_shape<Use, M, N, K>::cols };
    using element_type = T;
    T x[num_elements];
};

template <class T>
inline void ft_check_ptr(const T* p, unsigned ldm, const char* what) {
    if (((uintptr_t)p & 31u) != 0)
        ft_emu_rt_fail("wmma::%s: pointer %p is not 256-bit aligned", what, (const void*)p);
    const unsigned mult = 16u / (unsigned)sizeof(T);
    if (ldm % mult != 0)
        ft_emu_rt_fail("wmma::%s: ldm %u is not a multiple of %u elements (16 bytes)", what, ldm, mult);
}

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                  "matrix_a / matrix_b fragments carry their layout");
    ft_check_ptr(p, ldm, "load_matrix_sync");
    using F = fragment<Use, 16, 16, 16, T, Layout>;
    for (int r = 0; r < F::ft_rows; ++r)
        for (int c = 0; c < F::ft_cols; ++c)
            f.x[ft_slot(r * F::ft_cols + c)] =
                std::is_same<Layout, row_major>::value ? p[(size_t)r * ldm + c] : p[r + (size_t)c * ldm];
}

template <class T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm,
                             layout_t layout) {
    ft_check_ptr(p, ldm, "load_matrix_sync");
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[ft_slot(r * 16 + c)] = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[r + (size_t)c * ldm];
}

// Each lane stores only its share of the tile (element i by lane i % 32), as on a GPU, so
// that a read of the stored tile without a __syncwarp first sees stale data here too.
template <class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                              layout_t layout) {
    ft_check_ptr(p, ldm, "store_matrix_sync");
    const int lane = (int)ft_emu_detail::lane();
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) {
            if ((r * 16 + c) % 32 != lane) continue;
            T v = f.x[ft_slot(r * 16 + c)];
            if (layout == mem_row_major) p[(size_t)r * ldm + c] = v; else p[r + (size_t)c * ldm] = v;
        }
}

template <class Use, class T, class Layout, class V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
    const T t = T(v);
    for (int i = 0; i < fragment<Use, 16, 16, 16, T, Layout>::num_elements; ++i) f.x[i] = t;
}

// d = a * b + c: exact products of the inputs, accumulated in f32 (tensor cores add in an
// unspecified order with at least f32 precision).
template <class T, class LA, class LB, class C>
inline void mma_sync(fragment<accumulator, 16, 16, 16, C>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, C>& c) {
    static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                  "mma_sync inputs are __half or __nv_bfloat16");
    // The 32 lanes hold the same tiles: the first lane computes, the others reuse the
    // result when their inputs are bit-identical (a pure speed-up of the emulation).
    if (ft_emu_rt_memo_get(a.x, sizeof(a.x), b.x, sizeof(b.x), c.x, sizeof(c.x), d.x, sizeof(d.x))) return;
    fragment<accumulator, 16, 16, 16, C> r;
    float af[16][16], bf[16][16], out[16][16];
    for (int r = 0; r < 16; ++r)
        for (int k = 0; k < 16; ++k) {
            af[r][k] = (float)a.x[ft_slot(r * 16 + k)];
            bf[r][k] = (float)b.x[ft_slot(r * 16 + k)];
        }
    for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 16; ++col) out[r][col] = (float)c.x[ft_slot(r * 16 + col)];
    for (int r = 0; r < 16; ++r)
        for (int k = 0; k < 16; ++k) {
            const float av = af[r][k];
            for (int col = 0; col < 16; ++col) out[r][col] += av * bf[k][col];
        }
    for (int i = 0; i < 16; ++i)
        for (int col = 0; col < 16; ++col) r.x[ft_slot(i * 16 + col)] = C(out[i][col]);
    ft_emu_rt_memo_put(a.x, sizeof(a.x), b.x, sizeof(b.x), c.x, sizeof(c.x), r.x, sizeof(r.x));
    d = r;  // d may be c
}
}  // namespace wmma
}  // namespace
}  // namespace nvcuda
