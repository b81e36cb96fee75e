// Every kernel except attention (test_attention.cpp) against a plain C++ reference, on
// random inputs, for f32, f16 and bf16. Kernels are called through their ft_emu_* entry
// points, exactly as the Rust side calls them.
//
// Tolerances (printed with every check): element i passes when
//     |got − ref| <= rtol · max(|ref|, floor)
// with rtol = 1e-5 for f32 outputs and 2 ulps (2·2^-10 for f16, 2·2^-7 for bf16) for outputs
// rounded to f16 / bf16; `floor` is a small fraction of the tensor's largest value where the
// result can cancel (a relative error near zero means nothing), else tiny. Bit-exact where
// the kernel and the reference compute the very same thing (casts, dropout, row moves).
#include "harness.h"

FT_KERNEL_SET(rms_norm_fwd)
FT_KERNEL_SET(rms_norm_bwd)
FT_KERNEL_SET(rope)
FT_KERNEL_SET(swiglu_fwd)
FT_KERNEL_SET(swiglu_bwd)
FT_KERNEL_SET(dropout)
FT_KERNEL_SET(add)
FT_KERNEL_SET(gather_rows)
FT_KERNEL_SET(scatter_rows)
FT_KERNEL_SET(ce_rows)
FT_DECL(cast_f32_to_f16)
FT_DECL(cast_f32_to_bf16)
FT_DECL(cast_f16_to_f32)
FT_DECL(cast_f16_to_bf16)
FT_DECL(cast_bf16_to_f32)
FT_DECL(cast_bf16_to_f16)
FT_DECL(sum_f32)
FT_DECL(sum_f32_finish)
FT_DECL(adamw_f32)

using namespace th;

namespace {

template <class T>
double rtol_of() {
    return std::is_same<T, float>::value ? 1e-5 : 2 * DT<T>::eps;
}
template <class T>
T sentinel() {
    return DT<T>::make(-12345.0f);
}

// ------------------------------------------------------------------------------------------
template <class T>
void test_rms_norm(Rng& rng, int rows, int width) {
    const char* tn = DT<T>::name;
    const size_t n = (size_t)rows * width;
    auto x = randn<T>(rng, n, 1.5);
    std::vector<T> w(width);
    for (auto& v : w) v = DT<T>::make((float)(1.0 + 0.2 * rng.normal()));
    const float eps = 1e-5f;
    std::vector<T> y(n, sentinel<T>());
    std::vector<float> rstd(rows, -1.f);
    RmsNormFwdParams<T> p{x.data(), w.data(), y.data(), rstd.data(), rows, width, eps, 0};
    FT_LAUNCH(rms_norm_fwd, T, rows, 1, 1, 256, p);

    std::vector<double> want(n), r(rows);
    for (int i = 0; i < rows; ++i) {
        double ss = 0;
        for (int c = 0; c < width; ++c) ss += DT<T>::val(x[(size_t)i * width + c]) * DT<T>::val(x[(size_t)i * width + c]);
        r[i] = 1.0 / std::sqrt(ss / width + (double)eps);
        for (int c = 0; c < width; ++c) {
            const double normed = DT<T>::round(DT<T>::val(x[(size_t)i * width + c]) * r[i]);
            want[(size_t)i * width + c] = DT<T>::val(w[c]) * normed;
        }
    }
    const double scale = max_abs_of(want);
    Cmp cy(fmt("rms_norm_fwd %s rows=%d width=%d: y", tn, rows, width), rtol_of<T>(), 1e-3 * scale);
    for (size_t i = 0; i < n; ++i) cy.add(DT<T>::val(y[i]), want[i]);
    cy.done();
    Cmp cr(fmt("rms_norm_fwd %s rows=%d width=%d: rstd", tn, rows, width), 1e-5, 0);
    for (int i = 0; i < rows; ++i) cr.add(rstd[i], r[i]);
    cr.done();
    // no rstd, fewer blocks than rows (grid-stride): the same y
    std::vector<T> y2(n, sentinel<T>());
    RmsNormFwdParams<T> p2{x.data(), w.data(), y2.data(), nullptr, rows, width, eps, 0};
    FT_LAUNCH(rms_norm_fwd, T, 2, 1, 1, 256, p2);
    expect(std::memcmp(y.data(), y2.data(), n * sizeof(T)) == 0,
           fmt("rms_norm_fwd %s rows=%d width=%d: grid 2 and rstd=nullptr give the same y", tn, rows, width));

    // backward, written and accumulated
    auto dy = randn<T>(rng, n, 1.0);
    std::vector<float> rs(rows);
    for (int i = 0; i < rows; ++i) rs[i] = (float)r[i];
    for (int acc = 0; acc < 2; ++acc) {
        auto dx0 = randn<T>(rng, n, 1.0);
        std::vector<T> dx = acc ? dx0 : std::vector<T>(n, sentinel<T>());
        RmsNormBwdParams<T> pb{x.data(), w.data(), rs.data(), dy.data(), dx.data(), rows, width, acc, 0};
        FT_LAUNCH(rms_norm_bwd, T, rows, 1, 1, 256, pb);
        std::vector<double> wb(n);
        for (int i = 0; i < rows; ++i) {
            double dot = 0;
            const double ri = rs[i];
            for (int c = 0; c < width; ++c) {
                const size_t k = (size_t)i * width + c;
                dot += DT<T>::val(dy[k]) * DT<T>::val(w[c]) * DT<T>::val(x[k]);
            }
            for (int c = 0; c < width; ++c) {
                const size_t k = (size_t)i * width + c;
                const double gw = DT<T>::val(dy[k]) * DT<T>::val(w[c]);
                double v = ri * gw - DT<T>::val(x[k]) * ri * ri * ri * dot / width;
                if (acc) v += DT<T>::val(dx0[k]);
                wb[k] = v;
            }
        }
        const double sc = max_abs_of(wb);
        Cmp cb(fmt("rms_norm_bwd %s rows=%d width=%d accumulate=%d: dx", tn, rows, width, acc), rtol_of<T>(), 1e-2 * sc);
        for (size_t i = 0; i < n; ++i) cb.add(DT<T>::val(dx[i]), wb[i]);
        cb.done();
    }
}

// ------------------------------------------------------------------------------------------
template <class T>
void test_rope(Rng& rng, int head_dim) {
    const char* tn = DT<T>::name;
    const int rows = 9, q_heads = 2, kv_heads = 1, heads = q_heads + kv_heads;
    const int row_stride = (q_heads + 2 * kv_heads) * head_dim + 6;  // v heads and padding untouched
    const int half = head_dim / 2;
    std::vector<float> inv_freq(2 * half);
    for (int i = 0; i < half; ++i) {
        inv_freq[i] = (float)std::pow(10000.0, -2.0 * i / head_dim);
        inv_freq[half + i] = inv_freq[i] / (float)(1.0 + 0.37 * i);  // a "long" table
    }
    std::vector<int> pos(rows), tab(rows);
    for (int i = 0; i < rows; ++i) {
        pos[i] = i == 0 ? 0 : rng.integer(0, 4095);
        tab[i] = rng.integer(0, 1);
    }
    auto x0 = randn<T>(rng, (size_t)rows * row_stride, 1.0);
    const float mscale = 1.1902380714238083f;
    auto x = x0;
    RopeParams<T> p{x.data(), pos.data(), tab.data(), inv_freq.data(), rows, row_stride, heads, head_dim, mscale, 1.0f};
    FT_LAUNCH(rope, T, rows, 1, 1, 128, p);
    std::vector<double> want(x0.size());
    for (size_t i = 0; i < x0.size(); ++i) want[i] = DT<T>::val(x0[i]);
    for (int t = 0; t < rows; ++t)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < half; ++i) {
                const float angle = inv_freq[tab[t] * half + i] * (float)pos[t];  // the f32 product
                const double c = std::cos((double)angle) * mscale, s = std::sin((double)angle) * mscale;
                const size_t k = (size_t)t * row_stride + (size_t)h * head_dim + i;
                const double x1 = DT<T>::val(x0[k]), x2 = DT<T>::val(x0[k + half]);
                want[k] = x1 * c - x2 * s;
                want[k + half] = x2 * c + x1 * s;
            }
    const double sc = max_abs_of(want);
    Cmp c(fmt("rope %s rows=%d heads=%d(+1 v) head_dim=%d tables=2 mscale=%.3f: qk", tn, rows, heads, head_dim, mscale),
          rtol_of<T>(), 1e-2 * sc);
    bool untouched = true;
    for (int t = 0; t < rows; ++t)
        for (int e = 0; e < row_stride; ++e) {
            const size_t k = (size_t)t * row_stride + e;
            if (e < heads * head_dim) c.add(DT<T>::val(x[k]), want[k]);
            else untouched &= same_bits(x[k], x0[k]);
        }
    c.done();
    expect(untouched, fmt("rope %s head_dim=%d: v heads and row padding untouched", tn, head_dim));

    // sign -1 (the backward) inverts sign +1 when mscale = 1
    auto y = x0;
    RopeParams<T> pf{y.data(), pos.data(), tab.data(), inv_freq.data(), rows, row_stride, heads, head_dim, 1.0f, 1.0f};
    FT_LAUNCH(rope, T, rows, 1, 1, 128, pf);
    RopeParams<T> pb = pf;
    pb.sign = -1.0f;
    FT_LAUNCH(rope, T, 3, 1, 1, 128, pb);  // grid-stride over rows
    // two roundings to T, each relative to the pair's magnitude: relative to the scale
    const double rt = std::is_same<T, float>::value ? 1e-5 : 4 * DT<T>::eps;
    Cmp ci(fmt("rope %s head_dim=%d: sign -1 after sign +1 gives the input back", tn, head_dim), rt, 0.25 * sc);
    for (size_t k = 0; k < x0.size(); ++k) ci.add(DT<T>::val(y[k]), DT<T>::val(x0[k]));
    ci.done();
}

// ------------------------------------------------------------------------------------------
template <class T>
void test_swiglu(Rng& rng, int rows, int inter) {
    const char* tn = DT<T>::name;
    const size_t n = (size_t)rows * inter;
    auto gu = randn<T>(rng, 2 * n, 2.0);
    auto dy = randn<T>(rng, n, 1.0);
    std::vector<T> out(n, sentinel<T>()), dgu(2 * n, sentinel<T>());
    SwigluParams<T> pf{gu.data(), nullptr, out.data(), rows, inter};
    FT_LAUNCH(swiglu_fwd, T, (unsigned)((n + 255) / 256), 1, 1, 256, pf);
    SwigluParams<T> pb{gu.data(), dy.data(), dgu.data(), rows, inter};
    FT_LAUNCH(swiglu_bwd, T, 7, 1, 1, 256, pb);  // grid-stride
    std::vector<double> wf(n), wb(2 * n);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < inter; ++c) {
            const double g = DT<T>::val(gu[(size_t)r * 2 * inter + c]), u = DT<T>::val(gu[(size_t)r * 2 * inter + inter + c]);
            const double d = DT<T>::val(dy[(size_t)r * inter + c]);
            const double sg = 1.0 / (1.0 + std::exp(-g));
            wf[(size_t)r * inter + c] = g * sg * u;
            wb[(size_t)r * 2 * inter + c] = d * u * sg * (1.0 + g * (1.0 - sg));
            wb[(size_t)r * 2 * inter + inter + c] = d * g * sg;
        }
    Cmp cf(fmt("swiglu_fwd %s rows=%d inter=%d", tn, rows, inter), rtol_of<T>(), 1e-3 * max_abs_of(wf));
    for (size_t i = 0; i < n; ++i) cf.add(DT<T>::val(out[i]), wf[i]);
    cf.done();
    Cmp cb(fmt("swiglu_bwd %s rows=%d inter=%d", tn, rows, inter), rtol_of<T>(), 1e-3 * max_abs_of(wb));
    for (size_t i = 0; i < 2 * n; ++i) cb.add(DT<T>::val(dgu[i]), wb[i]);
    cb.done();
}

// ------------------------------------------------------------------------------------------
// The dropout hash, ported plainly (the Rust twin in src/kernels/dropout.rs must agree).
float dropout_uniform_ref(uint64_t key, uint64_t i) {
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

template <class T>
void test_dropout(Rng& rng) {
    const char* tn = DT<T>::name;
    const uint64_t n = 10007;
    const uint64_t key = ((uint64_t)rng.integer(0, 1 << 30) << 32) ^ (uint64_t)rng.integer(0, 1 << 30);
    const float pr = 0.25f, keep_scale = 1.0f / (1.0f - pr);
    auto x = randn<T>(rng, n, 1.0);
    std::vector<T> y(n, sentinel<T>());
    DropoutParams<T> p{x.data(), y.data(), n, key, pr, keep_scale};
    FT_LAUNCH(dropout, T, 5, 1, 1, 256, p);  // grid-stride
    size_t bad = 0, kept = 0;
    for (uint64_t i = 0; i < n; ++i) {
        const bool keep = dropout_uniform_ref(key, i) >= pr;
        kept += keep;
        const T want = DT<T>::make(keep ? (float)DT<T>::val(x[i]) * keep_scale : 0.0f);
        bad += !same_bits(y[i], want);
    }
    expect(bad == 0, fmt("dropout %s n=%" PRIu64 " p=%.2f: bit-exact against the plain hash (%zu kept, %zu differ)",
                         tn, n, pr, kept, bad));
    // in place (y == x)
    auto z = x;
    DropoutParams<T> pi{z.data(), z.data(), n, key, pr, keep_scale};
    FT_LAUNCH(dropout, T, (unsigned)((n + 255) / 256), 1, 1, 256, pi);
    expect(std::memcmp(z.data(), y.data(), n * sizeof(T)) == 0, fmt("dropout %s in place: the same result", tn));
}

// For key = 0x0123456789ABCDEF and p = 0.25, the first 8 elements (i = 0..7) draw
//     uniform = 0.08389616, 0.83379090, 0.18580192, 0.63604885,
//               0.00488734, 0.08099884, 0.72260064, 0.53590894
//     mask    = 0 1 0 1 0 0 1 1          (1 = kept, then multiplied by 1 / (1 − p))
// (checked below against the kernel; the Rust twin must reproduce them).
void test_dropout_known_values() {
    const uint64_t key = 0x0123456789ABCDEFull;
    const float pr = 0.25f;
    std::vector<float> x(8, 1.0f), y(8, -1.0f);
    DropoutParams<float> p{x.data(), y.data(), 8, key, pr, 1.0f / (1.0f - pr)};
    FT_LAUNCH(dropout, float, 1, 1, 1, 256, p);
    const int want_mask[8] = {0, 1, 0, 1, 0, 0, 1, 1};
    const double want_u[8] = {0.08389616, 0.83379090, 0.18580192, 0.63604885,
                              0.00488734, 0.08099884, 0.72260064, 0.53590894};
    bool ok = true;
    std::string got_mask, got_u;
    for (int i = 0; i < 8; ++i) {
        const float u = dropout_uniform_ref(key, (uint64_t)i);
        const int m = y[i] != 0.0f;
        got_mask += fmt("%d ", m);
        got_u += fmt("%.8f ", u);
        ok &= m == want_mask[i] && std::fabs(u - want_u[i]) < 5e-8 && (m == 0 || y[i] == 1.0f / (1.0f - pr));
    }
    std::printf("       key=0x0123456789ABCDEF p=0.25: uniforms %s\n       mask %s\n", got_u.c_str(), got_mask.c_str());
    expect(ok, "dropout: the documented first 8 mask values for key 0x0123456789ABCDEF, p = 0.25");
}

// ------------------------------------------------------------------------------------------
// Casts: every pair, special values included, bit-exact (NaN: any NaN).
std::vector<float> cast_inputs(Rng& rng) {
    std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, INFINITY, -INFINITY, NAN, -NAN,
                            65504.0f, 65519.99f, 65520.0f, 70000.0f, -65520.0f,  // f16 max / overflow
                            6.1035156e-05f, 5.9604645e-08f, 2.9802322e-08f, 2.98023259e-08f, 8.9406967e-08f,  // f16 subnormals, ties
                            1e-30f, 1.0e-40f, -3.0e-44f,                          // f32 subnormals
                            3.3895314e38f, 3.40282347e38f, -3.39e38f,             // bf16 max / overflow
                            1.00390625f, 1.01171875f, 1.0009765625f, 1.0029296875f,  // ties for bf16 / f16
                            0.1f, 1.0f / 3.0f, 2.0f / 3.0f, 1234.5678f};
    for (int i = 0; i < 3000; ++i) {
        const double mag = std::ldexp(rng.uniform(1.0, 2.0), rng.integer(-30, 20));
        v.push_back((float)(rng.integer(0, 1) ? mag : -mag));
    }
    for (int i = 0; i < 500; ++i) {  // exact ties of f16 and bf16
        const uint32_t base = (uint32_t)rng.integer(0x38800000, 0x47000000);
        uint32_t b1 = (base & 0xffffe000u) | 0x1000u, b2 = (base & 0xffff0000u) | 0x8000u;
        float f1, f2;
        std::memcpy(&f1, &b1, 4);
        std::memcpy(&f2, &b2, 4);
        v.push_back(f1);
        v.push_back(f2);
    }
    return v;
}

template <class A, class B>
void test_cast(LaunchFn fn, SizeFn size, const char* name, const std::vector<float>& vals) {
    const size_t n = vals.size();
    std::vector<A> src(n);
    for (size_t i = 0; i < n; ++i) src[i] = DT<A>::make(vals[i]);
    for (float scale : {1.0f, 0.3711f, 1024.0f}) {
        std::vector<B> dst(n, sentinel<B>());
        CastParams<A, B> p{src.data(), dst.data(), n, scale, 0};
        launch(fn, size, 3, 1, 1, 256, p);
        size_t bad = 0;
        size_t first = 0;
        for (size_t i = 0; i < n; ++i) {
            const float t = (float)DT<A>::val(src[i]) * scale;
            const B want = DT<B>::make(t);
            const bool ok = std::isnan(t) ? std::isnan(DT<B>::val(dst[i])) : same_bits(dst[i], want);
            if (!ok && bad++ == 0) first = i;
        }
        expect(bad == 0, fmt("%s n=%zu scale=%g: bit-exact, round to nearest even, NaN/inf/subnormals (%zu differ%s)",
                             name, n, scale, bad, bad ? fmt(", first input %.9g", (double)vals[first]).c_str() : ""));
    }
}

// ------------------------------------------------------------------------------------------
template <class T>
void test_add_and_rows(Rng& rng) {
    const char* tn = DT<T>::name;
    {
        const size_t n = 5000;
        auto y0 = randn<T>(rng, n), x = randn<T>(rng, n);
        auto y = y0;
        AddParams<T> p{y.data(), x.data(), n, -0.75f, 0};
        FT_LAUNCH(add, T, 4, 1, 1, 256, p);
        // relative to the inputs' scale (~1) where y and alpha·x cancel
        Cmp c(fmt("add %s n=%zu alpha=-0.75", tn, n), rtol_of<T>(), 0.1);
        for (size_t i = 0; i < n; ++i) c.add(DT<T>::val(y[i]), DT<T>::val(y0[i]) - 0.75 * DT<T>::val(x[i]));
        c.done();
    }
    {
        const int vocab = 101, width = 96, rows = 40;
        auto table = randn<T>(rng, (size_t)vocab * width);
        std::vector<int> idx(rows);
        for (auto& i : idx) i = rng.integer(0, vocab - 1);
        std::vector<T> out((size_t)rows * width, sentinel<T>());
        RowsParams<T> p{table.data(), out.data(), idx.data(), rows, width};
        FT_LAUNCH(gather_rows, T, rows, 1, 1, 128, p);
        bool ok = true;
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < width; ++c) ok &= same_bits(out[(size_t)r * width + c], table[(size_t)idx[r] * width + c]);
        expect(ok, fmt("gather_rows %s rows=%d width=%d from %d: exact", tn, rows, width, vocab));
        // scatter: distinct indices into a larger buffer
        std::vector<int> perm(vocab);
        for (int i = 0; i < vocab; ++i) perm[i] = i;
        std::shuffle(perm.begin(), perm.end(), rng.g);
        perm.resize(rows);
        auto dst0 = randn<T>(rng, (size_t)vocab * width);
        auto dst = dst0;
        RowsParams<T> ps{out.data(), dst.data(), perm.data(), rows, width};
        FT_LAUNCH(scatter_rows, T, 3, 1, 1, 128, ps);
        std::vector<int> from(vocab, -1);
        for (int i = 0; i < rows; ++i) from[perm[i]] = i;
        ok = true;
        for (int r = 0; r < vocab; ++r)
            for (int c = 0; c < width; ++c) {
                const T& got = dst[(size_t)r * width + c];
                ok &= from[r] >= 0 ? same_bits(got, out[(size_t)from[r] * width + c]) : same_bits(got, dst0[(size_t)r * width + c]);
            }
        expect(ok, fmt("scatter_rows %s rows=%d width=%d into %d: exact, other rows untouched", tn, rows, width, vocab));
    }
}

// ------------------------------------------------------------------------------------------
template <class T>
void test_ce(Rng& rng, int rows, int vocab) {
    const char* tn = DT<T>::name;
    const size_t n = (size_t)rows * vocab;
    auto logits0 = randn<T>(rng, n, 3.0);
    std::vector<int> targets(rows);
    for (auto& t : targets) t = rng.integer(0, vocab - 1);
    targets[0] = vocab - 1;
    const float scale = 0.37f;
    std::vector<double> want_loss(rows), want_grad(n);
    for (int r = 0; r < rows; ++r) {
        const T* x = logits0.data() + (size_t)r * vocab;
        double m = -INFINITY, s = 0;
        for (int j = 0; j < vocab; ++j) m = std::max(m, DT<T>::val(x[j]));
        for (int j = 0; j < vocab; ++j) s += std::exp(DT<T>::val(x[j]) - m);
        want_loss[r] = std::log(s) + m - DT<T>::val(x[targets[r]]);
        for (int j = 0; j < vocab; ++j)
            want_grad[(size_t)r * vocab + j] = scale * (std::exp(DT<T>::val(x[j]) - m) / s - (j == targets[r] ? 1.0 : 0.0));
    }
    for (int need_grad = 0; need_grad < 2; ++need_grad) {
        auto logits = logits0;
        std::vector<float> losses(rows, -1.f);
        CeRowsParams<T> p{logits.data(), targets.data(), losses.data(), rows, vocab, scale, need_grad};
        FT_LAUNCH(ce_rows, T, rows, 1, 1, 256, p);
        Cmp cl(fmt("ce_rows %s rows=%d vocab=%d need_grad=%d: loss", tn, rows, vocab, need_grad), 1e-5, 1.0);
        for (int r = 0; r < rows; ++r) cl.add(losses[r], want_loss[r]);
        cl.done();
        if (need_grad) {
            // relative to each row's largest gradient (the target's)
            Cmp cg(fmt("ce_rows %s rows=%d vocab=%d: gradient of %.2f·loss", tn, rows, vocab, scale), rtol_of<T>(),
                   1e-3 * scale);
            for (size_t i = 0; i < n; ++i) cg.add(DT<T>::val(logits[i]), want_grad[i]);
            cg.done();
        } else {
            expect(std::memcmp(logits.data(), logits0.data(), n * sizeof(T)) == 0,
                   fmt("ce_rows %s need_grad=0: logits untouched", tn));
        }
    }
}

// ------------------------------------------------------------------------------------------
void test_sum(Rng& rng) {
    const unsigned long long n = 100003;
    std::vector<float> x(n);
    for (auto& v : x) v = (float)(rng.normal() * 3.0 + 0.5);
    for (int square = 0; square < 2; ++square) {
        double out = 1.5;
        std::vector<double> partial(13, -777.0);
        SumParams p{x.data(), &out, partial.data(), n, square, 13};
        launch(ft_emu_sum_f32, ft_emu_sizeof_sum_f32, 13, 1, 1, 256, p);
        launch(ft_emu_sum_f32_finish, ft_emu_sizeof_sum_f32_finish, 1, 1, 1, 128, p);
        long double want = 1.5L;
        for (float v : x) want += square ? (long double)v * v : (long double)v;
        Cmp c(fmt("sum_f32 + sum_f32_finish n=%llu square=%d parts=13 (adds to *out = 1.5)", n, square), 1e-12, 1.0);
        c.add(out, (double)want);
        c.done();
    }
}

// ------------------------------------------------------------------------------------------
struct AdamRef {
    std::vector<float> p, m, v;
};
// The plain loop: params.cuh's AdamW, norm and clip in double.
AdamRef adamw_ref(const AdamRef& s, const std::vector<float>& g, double norm_sq, const AdamWParams& a, int* status) {
    AdamRef o = s;
    const double norm = std::sqrt(norm_sq) * a.grad_scale;
    if (!std::isfinite(norm)) {
        *status = 1;
        return o;
    }
    *status = 0;
    const double clip = a.max_norm > 0 ? std::min(1.0, a.max_norm / (norm + 1e-6)) : 1.0;
    for (size_t i = 0; i < g.size(); ++i) {
        const double gg = (double)g[i] * a.grad_scale * clip;
        double p = o.p[i], m = o.m[i], v = o.v[i];
        p *= 1.0 - (double)a.lr * a.weight_decay;
        m = m + (gg - m) * (1.0 - a.beta1);
        v = a.beta2 * v + (1.0 - a.beta2) * gg * gg;
        p -= (double)a.lr / a.bc1 * m / (std::sqrt(v) / a.bc2_sqrt + a.eps);
        o.p[i] = (float)p;
        o.m[i] = (float)m;
        o.v[i] = (float)v;
    }
    return o;
}

void test_adamw(Rng& rng) {
    const size_t n = 4099;
    AdamRef s;
    s.p.resize(n);
    s.m.resize(n);
    s.v.resize(n);
    std::vector<float> g(n);
    for (size_t i = 0; i < n; ++i) {
        s.p[i] = (float)rng.normal();
        s.m[i] = (float)(rng.normal() * 0.01);
        s.v[i] = (float)(std::fabs(rng.normal()) * 1e-4);
        g[i] = (float)(rng.normal() * 0.05);
    }
    double gsq = 0;
    for (float v : g) gsq += (double)v * v;
    struct Case {
        const char* what;
        double norm_sq;
        float grad_scale, max_norm;
    };
    const Case cases[] = {
        {"no clipping (max_norm 0), grad_scale 0.5", gsq, 0.5f, 0.0f},
        {"clipping active (norm > max_norm)", gsq, 1.0f, 0.25f},
        {"clipping inactive (norm < max_norm), grad_scale 0.25", gsq, 0.25f, 100.0f},
        {"non-finite norm (inf)", INFINITY, 1.0f, 1.0f},
        {"non-finite norm (NaN)", NAN, 1.0f, 1.0f},
    };
    const int t = 7;
    for (const Case& c : cases) {
        AdamWParams a{};
        a.lr = 2e-3f;
        a.beta1 = 0.9f;
        a.beta2 = 0.999f;
        a.eps = 1e-8f;
        a.weight_decay = 0.01f;
        a.bc1 = (float)(1.0 - std::pow(0.9, t));
        a.bc2_sqrt = (float)std::sqrt(1.0 - std::pow(0.999, t));
        a.grad_scale = c.grad_scale;
        a.max_norm = c.max_norm;
        AdamRef d = s;
        double norm_sq = c.norm_sq;
        int status = -7;
        a.p = d.p.data();
        a.g = g.data();
        a.m = d.m.data();
        a.v = d.v.data();
        a.norm_sq = &norm_sq;
        a.status = &status;
        a.n = n;
        auto g0 = g;
        launch(ft_emu_adamw_f32, ft_emu_sizeof_adamw_f32, 3, 1, 1, 256, a);
        int want_status = -1;
        AdamRef w = adamw_ref(s, g, c.norm_sq, a, &want_status);
        expect(status == want_status, fmt("adamw_f32 n=%zu %s: status %d (want %d)", n, c.what, status, want_status));
        if (want_status == 1) {
            expect(std::memcmp(d.p.data(), s.p.data(), n * 4) == 0 && std::memcmp(d.m.data(), s.m.data(), n * 4) == 0 &&
                       std::memcmp(d.v.data(), s.v.data(), n * 4) == 0,
                   fmt("adamw_f32 %s: parameters and moments unchanged", c.what));
        } else {
            // f32 against double: relative, with a floor at a tenth of each tensor's scale
            double sm = 0, sv = 0;
            for (size_t i = 0; i < n; ++i) {
                sm = std::max(sm, std::fabs((double)w.m[i]));
                sv = std::max(sv, std::fabs((double)w.v[i]));
            }
            Cmp cp(fmt("adamw_f32 n=%zu %s: p", n, c.what), 1e-5, 1e-1);
            Cmp cm(fmt("adamw_f32 n=%zu %s: m", n, c.what), 1e-5, 0.1 * sm);
            Cmp cv(fmt("adamw_f32 n=%zu %s: v", n, c.what), 1e-5, 0.1 * sv);
            for (size_t i = 0; i < n; ++i) {
                cp.add(d.p[i], w.p[i]);
                cm.add(d.m[i], w.m[i]);
                cv.add(d.v[i], w.v[i]);
            }
            cp.done();
            cm.done();
            cv.done();
        }
        expect(std::memcmp(g.data(), g0.data(), n * 4) == 0, fmt("adamw_f32 %s: gradients untouched", c.what));
    }
}

template <class T>
void run_typed(Rng& rng) {
    test_rms_norm<T>(rng, 3, 3072);
    test_rms_norm<T>(rng, 5, 1001);
    test_rope<T>(rng, 96);
    test_rope<T>(rng, 16);
    test_swiglu<T>(rng, 3, 8192);
    test_swiglu<T>(rng, 5, 777);
    test_dropout<T>(rng);
    test_add_and_rows<T>(rng);
    test_ce<T>(rng, 4, 32064);
    test_ce<T>(rng, 3, 1000);
}

}  // namespace

void run_kernel_tests() {
    Rng rng(20240607);
    run_typed<float>(rng);
    run_typed<__half>(rng);
    run_typed<__nv_bfloat16>(rng);
    test_dropout_known_values();
    const auto vals = cast_inputs(rng);
    test_cast<float, __half>(ft_emu_cast_f32_to_f16, ft_emu_sizeof_cast_f32_to_f16, "cast_f32_to_f16", vals);
    test_cast<float, __nv_bfloat16>(ft_emu_cast_f32_to_bf16, ft_emu_sizeof_cast_f32_to_bf16, "cast_f32_to_bf16", vals);
    test_cast<__half, float>(ft_emu_cast_f16_to_f32, ft_emu_sizeof_cast_f16_to_f32, "cast_f16_to_f32", vals);
    test_cast<__half, __nv_bfloat16>(ft_emu_cast_f16_to_bf16, ft_emu_sizeof_cast_f16_to_bf16, "cast_f16_to_bf16", vals);
    test_cast<__nv_bfloat16, float>(ft_emu_cast_bf16_to_f32, ft_emu_sizeof_cast_bf16_to_f32, "cast_bf16_to_f32", vals);
    test_cast<__nv_bfloat16, __half>(ft_emu_cast_bf16_to_f16, ft_emu_sizeof_cast_bf16_to_f16, "cast_bf16_to_f16", vals);
    test_sum(rng);
    test_adamw(rng);
}

int test_failures() { return report().failures; }
int test_checks() { return report().checks; }
