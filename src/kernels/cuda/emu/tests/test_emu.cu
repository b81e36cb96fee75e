// Self-tests of the CUDA emulator, written as CUDA (compiled like the kernels, with
// -include cuda_emu.h): barriers and shared memory, warp shuffles and votes, dynamic shared
// memory, WMMA against a plain product, atomics from several host threads at once, and the
// failures it must detect (run one by one through --death by scripts/test_kernels_emu.sh).
#include <thread>
#include <vector>

#include "../../common.cuh"
#include "harness.h"

using namespace th;

namespace {

struct EmuParams {
    int* out;
    double* dout;
    const float* a;
    const float* b;
    float* c;
    int n;
    int mode;
};

// Block reversal through static shared memory, twice in a row (the barrier reused).
__device__ void k_reverse(const EmuParams& p) {
    __shared__ int buf[256];
    const int t = threadIdx.x, n = blockDim.x;
    for (int round = 0; round < 2; ++round) {
        buf[t] = p.out[blockIdx.x * n + t] + round;
        __syncthreads();
        const int v = buf[n - 1 - t];
        __syncthreads();
        p.out[blockIdx.x * n + t] = v;
    }
}

// Shuffles of int and double: xor, down, up, indexed, with width 32 and 8; votes.
__device__ void k_shuffle(const EmuParams& p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int* o = p.out + (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    const int v = 1000 * warp + lane;
    o[0] = __shfl_xor_sync(kFullMask, v, 5);
    o[1] = __shfl_down_sync(kFullMask, v, 3);
    o[2] = __shfl_up_sync(kFullMask, v, 2, 8);
    o[3] = __shfl_sync(kFullMask, v, 7 - (lane & 7), 8);
    o[4] = (int)__shfl_xor_sync(kFullMask, (double)v + 0.5, 16);
    o[5] = (int)__ballot_sync(kFullMask, lane % 3 == 0);
    o[6] = __all_sync(kFullMask, v >= 1000 * warp) + 2 * __any_sync(kFullMask, lane == 31);
    // consecutive shuffles with no other barrier between them
    int acc = v;
    for (int off = 1; off < 32; off <<= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
    o[7] = acc;
}

__device__ void k_dyn_smem(const EmuParams& p) {
    FT_DYN_SMEM(float, dyn);
    const int t = threadIdx.x;
    dyn[t] = (float)t;
    __syncthreads();
    p.out[t] = (int)dyn[blockDim.x - 1 - t];
    if (p.mode == 1 && t == 0) dyn[p.n / 4] = 1.0f;  // past the request when n bytes were asked
}

// One warp: C = A·B + C for 16x16x16 with T inputs, with row- and column-major operands.
template <class T>
__device__ void k_wmma(const EmuParams& p) {
    namespace wm = nvcuda::wmma;
    __shared__ __align__(32) T a[256];
    __shared__ __align__(32) T b[256];
    __shared__ __align__(32) float c[256];
    for (int i = threadIdx.x; i < 256; i += 32) {
        a[i] = from_f32<T>(p.a[i]);
        b[i] = from_f32<T>(p.b[i]);
        c[i] = p.c[i];
    }
    __syncwarp();
    wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> fa;
    wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> fb;  // b holds Bᵀ row-major
    wm::fragment<wm::accumulator, 16, 16, 16, float> fc;
    wm::load_matrix_sync(fa, a, 16);
    wm::load_matrix_sync(fb, b, 16);
    wm::load_matrix_sync(fc, c, 16, wm::mem_col_major);
    for (int i = 0; i < fc.num_elements; ++i) fc.x[i] *= 2.0f;  // element-wise: layout-free
    wm::mma_sync(fc, fa, fb, fc);
    __syncwarp();
    wm::store_matrix_sync(c, fc, 16, wm::mem_row_major);
    __syncwarp();
    for (int i = threadIdx.x; i < 256; i += 32) p.c[i] = c[i];
    if (p.mode == 1) wm::load_matrix_sync(fa, a + 8, 16);  // misaligned: must abort
}

// The math functions and intrinsics the emulator provides beyond the C library's.
__device__ void k_math(const EmuParams& p) {
    if (threadIdx.x != 0) return;
    float s, c;
    sincosf(0.5f, &s, &c);
    const float* a = p.a;
    p.c[0] = s - sinf(0.5f) + c - cosf(0.5f);
    p.c[1] = rsqrtf(a[0]) - 0.5f;                  // a[0] = 4
    p.c[2] = __expf(a[1]) - expf(a[1]);             // a[1] = 1.5
    p.c[3] = __fdividef(a[0], 2.0f) - 2.0f;
    p.c[4] = __logf(a[0]) - logf(4.0f);
    p.c[5] = fmaxf(a[1], -INFINITY) - a[1] + (__float_as_uint(1.0f) == 0x3f800000u ? 0.f : 1.f);
    p.c[6] = __saturatef(a[1]) - 1.0f + (float)(__popc(0xf0u) - 4);
}

__device__ void k_atomic(const EmuParams& p) {
    atomicAdd(p.dout, 1.0);
    atomicAdd(p.out, 1);
}

// Failures the emulator must detect.
__device__ void k_death(const EmuParams& p) {
    if (p.mode == 0) {  // a barrier that some threads never reach
        if (threadIdx.x == 5) return;
        __syncthreads();
    } else if (p.mode == 1) {  // lanes of one warp at different warp operations
        if (threadIdx.x < 16) __syncwarp();
        else __shfl_xor_sync(kFullMask, 1, 1);
    } else if (p.mode == 2) {
        __trap();
    } else if (p.mode == 3) {  // a lane exits while the others wait for it
        if (threadIdx.x == 3) return;
        __syncwarp();
    }
}

}  // namespace

extern "C" __global__ void emu_reverse(const EmuParams p) { k_reverse(p); }
FT_EXPORT(emu_reverse, EmuParams)
extern "C" __global__ void emu_shuffle(const EmuParams p) { k_shuffle(p); }
FT_EXPORT(emu_shuffle, EmuParams)
extern "C" __global__ void emu_dyn_smem(const EmuParams p) { k_dyn_smem(p); }
FT_EXPORT(emu_dyn_smem, EmuParams)
extern "C" __global__ void emu_wmma_f16(const EmuParams p) { k_wmma<__half>(p); }
FT_EXPORT(emu_wmma_f16, EmuParams)
extern "C" __global__ void emu_wmma_bf16(const EmuParams p) { k_wmma<__nv_bfloat16>(p); }
FT_EXPORT(emu_wmma_bf16, EmuParams)
extern "C" __global__ void emu_math(const EmuParams p) { k_math(p); }
FT_EXPORT(emu_math, EmuParams)
extern "C" __global__ void emu_atomic(const EmuParams p) { k_atomic(p); }
FT_EXPORT(emu_atomic, EmuParams)
extern "C" __global__ void emu_death(const EmuParams p) { k_death(p); }
FT_EXPORT(emu_death, EmuParams)

void run_emu_tests() {
    {  // barriers + shared memory, 3 blocks of 256
        std::vector<int> v(3 * 256);
        for (int i = 0; i < (int)v.size(); ++i) v[i] = i;
        EmuParams p{v.data(), nullptr, nullptr, nullptr, nullptr, 0, 0};
        ft_emu_emu_reverse(3, 1, 1, 256, 1, 1, 0, &p);
        bool ok = true;  // reversed twice (+0, then +1): v[i] = i + 1
        for (int i = 0; i < (int)v.size(); ++i) ok &= v[i] == i + 1;
        expect(ok, "emulator: __syncthreads and static shared memory (blocks in both fiber orders)");
    }
    {  // shuffles and votes, 2 blocks of 64 threads
        const int n = 2 * 64;
        std::vector<int> o(n * 8, -1);
        EmuParams p{o.data(), nullptr, nullptr, nullptr, nullptr, 0, 0};
        ft_emu_emu_shuffle(2, 1, 1, 64, 1, 1, 0, &p);
        bool ok = true;
        for (int t = 0; t < n; ++t) {
            const int lane = t % 32, warp = (t % 64) / 32, v = 1000 * warp + lane;
            auto val = [&](int l) { return 1000 * warp + l; };
            const int* r = o.data() + t * 8;
            ok &= r[0] == val(lane ^ 5);
            ok &= r[1] == (lane + 3 < 32 ? val(lane + 3) : v);
            ok &= r[2] == ((lane & 7) >= 2 ? val(lane - 2) : v);
            ok &= r[3] == val((lane & ~7) + 7 - (lane & 7));
            ok &= r[4] == val(lane ^ 16);
            unsigned ballot = 0;
            for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
            ok &= (unsigned)r[5] == ballot;
            ok &= r[6] == 3;
            ok &= r[7] == 32 * 1000 * warp + 496;
        }
        expect(ok, "emulator: __shfl_xor/down/up/sync (width 32 and 8, int and double), ballot/all/any, chained shuffles");
    }
    {  // dynamic shared memory
        std::vector<int> o(64, -1);
        EmuParams p{o.data(), nullptr, nullptr, nullptr, nullptr, 256, 0};
        ft_emu_emu_dyn_smem(1, 1, 1, 64, 1, 1, 256, &p);
        bool ok = true;
        for (int t = 0; t < 64; ++t) ok &= o[t] == 63 - t;
        expect(ok, "emulator: dynamic shared memory (FT_DYN_SMEM)");
    }
    for (int bf = 0; bf < 2; ++bf) {  // WMMA
        Rng rng(5 + bf);
        std::vector<float> a(256), b(256), c(256);
        for (auto& x : a) x = (float)rng.normal();
        for (auto& x : b) x = (float)rng.normal();
        for (auto& x : c) x = (float)rng.normal();
        auto rd = [&](float f) { return bf ? bf16_value(bf16_bits(f)) : f16_value(f16_bits(f)); };
        std::vector<float> out = c;
        EmuParams p{nullptr, nullptr, a.data(), b.data(), out.data(), 0, 0};
        if (bf) ft_emu_emu_wmma_bf16(1, 1, 1, 32, 1, 1, 0, &p);
        else ft_emu_emu_wmma_f16(1, 1, 1, 32, 1, 1, 0, &p);
        Cmp cmp(bf ? "emulator: wmma 16x16x16 bf16 (A row-major, B col-major, C col-major in) vs plain loops"
                   : "emulator: wmma 16x16x16 f16 (A row-major, B col-major, C col-major in) vs plain loops",
                1e-5, 1.0);
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                double want = 2.0 * c[j * 16 + i];  // C loaded column-major
                for (int k = 0; k < 16; ++k) want += rd(a[i * 16 + k]) * rd(b[j * 16 + k]);
                cmp.add(out[i * 16 + j], want);
            }
        cmp.done();
    }
    {  // math functions and intrinsics
        std::vector<float> a = {4.0f, 1.5f}, c(8, -1.0f);
        EmuParams p{nullptr, nullptr, a.data(), nullptr, c.data(), 0, 0};
        ft_emu_emu_math(1, 1, 1, 32, 1, 1, 0, &p);
        bool ok = true;
        for (int i = 0; i < 7; ++i) ok &= std::isnan(c[i]) ? false : std::fabs(c[i]) < 1e-6f;
        expect(ok, "emulator: sincosf, rsqrtf, __expf, __fdividef, __logf, fmaxf/INFINITY, bit casts, __saturatef, __popc");
    }
    {  // atomics from 4 host threads at once, 20 blocks x 64 threads each
        double total = 0;
        int count = 0;
        std::vector<std::thread> ts;
        for (int t = 0; t < 4; ++t)
            ts.emplace_back([&] {
                EmuParams p{&count, &total, nullptr, nullptr, nullptr, 0, 0};
                ft_emu_emu_atomic(20, 1, 1, 64, 1, 1, 0, &p);
            });
        for (auto& t : ts) t.join();
        expect(total == 4 * 20 * 64 && count == 4 * 20 * 64,
               fmt("emulator: atomicAdd (double, int) from 4 host threads launching at once (%g, %d)", total, count));
    }
}

// One failure per process: the script checks the exit status and the message.
int run_death(const char* which) {
    const std::string w = which;
    std::vector<int> o(1024, 0);
    std::vector<float> f(256, 0.f);
    EmuParams p{o.data(), nullptr, f.data(), f.data(), f.data(), 0, 0};
    if (w == "barrier") { p.mode = 0; ft_emu_emu_death(1, 1, 1, 64, 1, 1, 0, &p); }
    else if (w == "divergent") { p.mode = 1; ft_emu_emu_death(1, 1, 1, 32, 1, 1, 0, &p); }
    else if (w == "trap") { p.mode = 2; ft_emu_emu_death(1, 1, 1, 32, 1, 1, 0, &p); }
    else if (w == "lane-exit") { p.mode = 3; ft_emu_emu_death(1, 1, 1, 32, 1, 1, 0, &p); }
    else if (w == "block-size") { ft_emu_emu_reverse(1, 1, 1, 2048, 1, 1, 0, &p); }
    else if (w == "grid-size") { ft_emu_emu_reverse(1, 70000, 1, 32, 1, 1, 0, &p); }
    else if (w == "smem-limit") { ft_emu_emu_dyn_smem(1, 1, 1, 64, 1, 1, 64 * 1024, &p); }
    else if (w == "smem-overrun") { p.n = 256; p.mode = 1; ft_emu_emu_dyn_smem(1, 1, 1, 64, 1, 1, 256, &p); }
    else if (w == "wmma-align") { p.mode = 1; ft_emu_emu_wmma_f16(1, 1, 1, 32, 1, 1, 0, &p); }
    else {
        std::fprintf(stderr, "unknown death case %s\n", which);
        return 2;
    }
    std::printf("no failure detected\n");
    return 0;
}
