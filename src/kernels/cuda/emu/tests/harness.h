// Test support for the emulated kernels: dtype traits with rounding written independently
// of the emulator's (so the conversions are checked too), random data, kernel launch
// through the exported ft_emu_* entry points (as the Rust side calls them), and the
// error report every check prints.
#pragma once

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdarg>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../params.cuh"

using LaunchFn = void (*)(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, const void*);
using SizeFn = unsigned long long (*)();

#define FT_DECL(name)                                                                           \
    extern "C" void ft_emu_##name(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,  \
                                  unsigned, const void*);                                      \
    extern "C" unsigned long long ft_emu_sizeof_##name();

// Declares base_{f32,f16,bf16} and a template picking one by type: base_fn<T>().
#define FT_KERNEL_SET(base)                                                                     \
    FT_DECL(base##_f32)                                                                         \
    FT_DECL(base##_f16)                                                                         \
    FT_DECL(base##_bf16)                                                                        \
    template <class T>                                                                          \
    struct base##_k;                                                                            \
    template <>                                                                                 \
    struct base##_k<float> {                                                                    \
        static LaunchFn fn() { return ft_emu_##base##_f32; }                                    \
        static SizeFn size() { return ft_emu_sizeof_##base##_f32; }                             \
    };                                                                                          \
    template <>                                                                                 \
    struct base##_k<__half> {                                                                   \
        static LaunchFn fn() { return ft_emu_##base##_f16; }                                    \
        static SizeFn size() { return ft_emu_sizeof_##base##_f16; }                             \
    };                                                                                          \
    template <>                                                                                 \
    struct base##_k<__nv_bfloat16> {                                                            \
        static LaunchFn fn() { return ft_emu_##base##_bf16; }                                   \
        static SizeFn size() { return ft_emu_sizeof_##base##_bf16; }                            \
    };

namespace th {

// ------------------------------------------------------------------------------------------
// Rounding to f16 / bf16, independent of the emulator: f16 through the compiler's _Float16,
// bf16 by picking the nearer of the two neighbours in double (ties to the even one).
inline uint16_t f16_bits(float f) {
    _Float16 h = (_Float16)f;
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
}
inline double f16_value(uint16_t b) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return (double)h;
}
inline uint16_t bf16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if (std::isnan(f)) return 0x7fc0;
    const uint32_t lo = x & 0xffff0000u;  // toward zero
    if (lo == x) return (uint16_t)(x >> 16);
    const uint32_t hi = lo + 0x10000u;  // away from zero (0x7f80xxxx: infinity)
    auto val = [](uint32_t bits) {
        if ((bits & 0x7fffffffu) == 0x7f800000u) return std::copysign(std::ldexp(1.0, 128), (double)((int32_t)bits < 0 ? -1 : 1));
        float v;
        std::memcpy(&v, &bits, 4);
        return (double)v;
    };
    const double dl = std::fabs((double)f - val(lo)), dh = std::fabs(val(hi) - (double)f);
    if (dl < dh) return (uint16_t)(lo >> 16);
    if (dh < dl) return (uint16_t)(hi >> 16);
    return ((lo >> 16) & 1) ? (uint16_t)(hi >> 16) : (uint16_t)(lo >> 16);
}
inline double bf16_value(uint16_t b) {
    const uint32_t x = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return (double)f;
}

template <class T>
struct DT;
template <>
struct DT<float> {
    static constexpr const char* name = "f32";
    static constexpr double eps = 1.1920928955078125e-07;  // 2^-23
    static float make(float f) { return f; }
    static double val(float x) { return (double)x; }
    static float round(double v) { return (float)v; }  // value rounded to the type, as float
};
template <>
struct DT<__half> {
    static constexpr const char* name = "f16";
    static constexpr double eps = 9.765625e-04;  // 2^-10
    static __half make(float f) { __half h; h.__x = f16_bits(f); return h; }
    static double val(__half x) { return f16_value(x.__x); }
    static float round(double v) { return (float)f16_value(f16_bits((float)v)); }
};
template <>
struct DT<__nv_bfloat16> {
    static constexpr const char* name = "bf16";
    static constexpr double eps = 7.8125e-03;  // 2^-7
    static __nv_bfloat16 make(float f) { __nv_bfloat16 h; h.__x = bf16_bits(f); return h; }
    static double val(__nv_bfloat16 x) { return bf16_value(x.__x); }
    static float round(double v) { return (float)bf16_value(bf16_bits((float)v)); }
};

template <class T>
inline bool same_bits(const T& a, const T& b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

// ------------------------------------------------------------------------------------------
// Random data
struct Rng {
    std::mt19937_64 g;
    explicit Rng(uint64_t seed) : g(seed) {}
    double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
    double uniform(double a, double b) { return std::uniform_real_distribution<double>(a, b)(g); }
    int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); }  // inclusive
};
template <class T>
std::vector<T> randn(Rng& r, size_t n, double scale = 1.0) {
    std::vector<T> v(n);
    for (auto& x : v) x = DT<T>::make((float)(r.normal() * scale));
    return v;
}
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
    std::vector<double> d(v.size());
    for (size_t i = 0; i < v.size(); ++i) d[i] = DT<T>::val(v[i]);
    return d;
}

// ------------------------------------------------------------------------------------------
// Launch
template <class P>
void launch(LaunchFn fn, SizeFn size, unsigned gx, unsigned gy, unsigned gz, unsigned bx, const P& p) {
    if (size() != sizeof(P)) {
        std::fprintf(stderr, "sizeof mismatch: kernel %llu, test %zu\n", size(), sizeof(P));
        std::exit(2);
    }
    fn(gx, gy, gz, bx, 1, 1, 0, &p);
}
#define FT_LAUNCH(base, T, gx, gy, gz, bx, p) th::launch(base##_k<T>::fn(), base##_k<T>::size(), gx, gy, gz, bx, p)

// ------------------------------------------------------------------------------------------
// Reporting: every check prints its shape, errors and tolerance; failures are counted.
// Checks that run on worker threads write into their job's buffer (sink), printed in order.
struct Report {
    std::atomic<int> checks{0}, failures{0};
};
inline Report& report() {
    static Report r;
    return r;
}
inline std::string*& sink() {
    static thread_local std::string* s = nullptr;
    return s;
}
__attribute__((format(printf, 1, 2))) inline void out(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    if (sink()) {
        *sink() += buf;
    } else {
        std::fputs(buf, stdout);
        std::fflush(stdout);
    }
}

// Element i passes when |got − want| <= rtol · max(|want|, floor). NaN must match NaN.
struct Cmp {
    std::string what;
    double rtol, floor;
    double max_abs = 0, max_rel = 0;
    size_t n = 0, bad = 0, first_bad = (size_t)-1;
    double bad_got = 0, bad_want = 0;
    Cmp(std::string w, double rtol_, double floor_) : what(std::move(w)), rtol(rtol_), floor(floor_) {}
    void add(double got, double want) {
        ++n;
        if (std::isnan(want) || std::isnan(got)) {
            if (std::isnan(want) != std::isnan(got)) note_bad(got, want);
            return;
        }
        if (std::isinf(want) || std::isinf(got)) {
            if (got != want) note_bad(got, want);
            return;
        }
        const double a = std::fabs(got - want);
        const double rel = a / std::max(std::fabs(want), floor);
        max_abs = std::max(max_abs, a);
        max_rel = std::max(max_rel, rel);
        if (!(rel <= rtol)) note_bad(got, want);
    }
    void note_bad(double got, double want) {
        if (bad++ == 0) {
            first_bad = n - 1;
            bad_got = got;
            bad_want = want;
        }
    }
    bool done() {
        Report& r = report();
        r.checks++;
        const bool ok = bad == 0 && n > 0;
        if (!ok) r.failures++;
        out("[%s] %-64s n=%-8zu max_abs=%.3e max_rel=%.3e  tol: rel %.1e of max(|ref|, %.1e)\n",
            ok ? "PASS" : "FAIL", what.c_str(), n, max_abs, max_rel, rtol, floor);
        if (!ok && n > 0) out("       %zu bad, first at %zu: got %.9g want %.9g\n", bad, first_bad, bad_got, bad_want);
        return ok;
    }
};

inline bool expect(bool cond, const std::string& what) {
    Report& r = report();
    r.checks++;
    if (!cond) r.failures++;
    out("[%s] %s\n", cond ? "PASS" : "FAIL", what.c_str());
    return cond;
}

inline double max_abs_of(const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m = std::max(m, std::fabs(x));
    return m;
}

template <class... A>
std::string fmt(const char* f, A... a) {
    char buf[512];
    std::snprintf(buf, sizeof buf, f, a...);
    return buf;
}

}  // namespace th
