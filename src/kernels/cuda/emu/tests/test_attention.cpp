// Attention kernels against a plain f64 reference: forward (out, lse) and the backward of
// Σ(out · probe) (dq, dk, dv), for the tensor-core and the SIMT kernels, f32 / f16 / bf16.
//
// The reference knows nothing about tiles: per segment, head and query row it lists the
// visible keys (j <= past + r, past + r − j < window), takes the softmax of the scaled dot
// products in double, and the textbook gradients (dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ∘ O)),
// dQ = scale · dS K, dK = scale · dSᵀ Q, dV = Pᵀ dO, summed over each kv head's query heads).
//
// Tolerances are relative to each tensor's scale (the largest reference value), since every
// output is a reduction: |got − ref| <= rtol · max(max|ref|, 0.1), with rtol
//   f32: 2e-5;   f16: 1.5 · 2^-10 (out), 2 · 2^-10 (gradients);   bf16: 1.5 · 2^-7, 2 · 2^-7
// i.e. 1.5 and 2 units in the last place of a value of magnitude 1-2 (outputs here reach
// 2-7), with room for the tensor-core kernels rounding P and dS to the input type before
// the second product (as flash-attention does) and the backward's delta coming from the
// rounded output; measured so far: f16 at most 0.4 (out) and 0.65 (gradients) of 2^-10,
// bf16 0.4 and 0.7 of 2^-7, f32 6.5e-6. lse to 1e-5 relative (f32 from exact products).
// Also checked: every element the kernels must not write keeps its sentinel (gap rows
// between segments, row padding, the other heads' columns), and a second backward run is
// bit-identical to the first.
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include "harness.h"

FT_KERNEL_SET(attn_fwd)
FT_KERNEL_SET(attn_fwd_simt)
FT_KERNEL_SET(attn_bwd_dot)
FT_KERNEL_SET(attn_bwd_dot_simt)
FT_KERNEL_SET(attn_bwd_dkdv)
FT_KERNEL_SET(attn_bwd_dkdv_simt)
FT_KERNEL_SET(attn_bwd_dq)
FT_KERNEL_SET(attn_bwd_dq_simt)
FT_KERNEL_SET(kv_append)

using namespace th;

namespace {

constexpr int kTile = 64;

struct Case {
    std::string name;
    std::vector<int> lens, pasts;  // pasts empty: all 0
    int heads, kv_heads, D;
    int window;        // INT_MAX: none
    bool generation;   // separate K/V storage per segment (else the fused qkv buffer)
    int stride_pad;    // extra elements per row of q / qkv / K-V (alignment of the staging)
    bool tc = true;    // run the tensor-core kernels too (head_dim multiple of 16)
    bool simt_names_f32 = false;  // also the attn_*_simt_f32 names (the same code as attn_*_f32)
};

enum class Variant { TC, SIMT };

struct Ref {
    std::vector<double> out, lse, dq, dk, dv;  // indexed like the kernel buffers (see below)
};

template <class T>
struct Setup {
    const Case& c;
    int n_segs, rows, q_stride, out_stride, lse_stride, dq_stride, kv_stride;
    std::vector<int> q_row, past;
    std::vector<T> qbuf;                       // training: qkv; generation: q
    std::vector<std::vector<T>> kc, vc;        // generation: per-segment K / V storage
    std::vector<T> probe;
    explicit Setup(const Case& cs, Rng& rng) : c(cs) {
        n_segs = (int)c.lens.size();
        past.assign(n_segs, 0);
        if (!c.pasts.empty()) past = c.pasts;
        rows = 0;
        const int gap = 2;  // rows between segments that belong to none
        for (int s = 0; s < n_segs; ++s) {
            rows += gap;
            q_row.push_back(rows);
            rows += c.lens[s];
        }
        rows += gap;
        const int H = c.heads, G = c.kv_heads, D = c.D;
        if (!c.generation) {
            q_stride = (H + 2 * G) * D + c.stride_pad;
            kv_stride = q_stride;
            dq_stride = q_stride;
        } else {
            q_stride = H * D + c.stride_pad;
            kv_stride = G * D + c.stride_pad;
            dq_stride = H * D + 4;
        }
        out_stride = H * D + 8;
        lse_stride = rows + 3;
        qbuf = randn<T>(rng, (size_t)rows * q_stride, 1.0);
        if (c.generation) {
            for (int s = 0; s < n_segs; ++s) {
                kc.push_back(randn<T>(rng, (size_t)(past[s] + c.lens[s]) * kv_stride, 1.0));
                vc.push_back(randn<T>(rng, (size_t)(past[s] + c.lens[s]) * kv_stride, 1.0));
            }
        }
        probe = randn<T>(rng, (size_t)rows * out_stride, 1.0);
    }
    const T* kptr(int s) const {
        return c.generation ? kc[s].data() : qbuf.data() + (size_t)q_row[s] * q_stride + (size_t)c.heads * c.D;
    }
    const T* vptr(int s) const {
        return c.generation ? vc[s].data() : qbuf.data() + (size_t)q_row[s] * q_stride + (size_t)(c.heads + c.kv_heads) * c.D;
    }
    double qv(int s, int r, int h, int col) const {
        return DT<T>::val(qbuf[(size_t)(q_row[s] + r) * q_stride + (size_t)h * c.D + col]);
    }
    double kv(int s, int j, int g, int col) const { return DT<T>::val(kptr(s)[(size_t)j * kv_stride + (size_t)g * c.D + col]); }
    double vv(int s, int j, int g, int col) const { return DT<T>::val(vptr(s)[(size_t)j * kv_stride + (size_t)g * c.D + col]); }
    double dov(int s, int r, int h, int col) const {
        return DT<T>::val(probe[(size_t)(q_row[s] + r) * out_stride + (size_t)h * c.D + col]);
    }
    int max_len() const { return *std::max_element(c.lens.begin(), c.lens.end()); }
    int max_kv() const {
        int m = 0;
        for (int s = 0; s < n_segs; ++s) m = std::max(m, past[s] + c.lens[s]);
        return m;
    }
};

// out/dq: [row][h·D + col] of rows × (heads·D); lse: [h][row]; dk/dv: per segment, [j][g·D + col]
template <class T>
Ref reference(const Setup<T>& S) {
    const Case& c = S.c;
    const int H = c.heads, G = c.kv_heads, D = c.D, group = H / G;
    const double scale = 1.0 / std::sqrt((double)D);
    Ref R;
    R.out.assign((size_t)S.rows * H * D, 0);
    R.dq.assign((size_t)S.rows * H * D, 0);
    R.lse.assign((size_t)H * S.rows, 0);
    size_t kv_rows = 0;
    for (int s = 0; s < S.n_segs; ++s) kv_rows += S.past[s] + c.lens[s];
    R.dk.assign(kv_rows * G * D, 0);
    R.dv.assign(kv_rows * G * D, 0);
    size_t kv_base = 0;
    std::vector<double> sc, pr, q, k, v, dout;
    for (int s = 0; s < S.n_segs; ++s) {
        const int len = c.lens[s], past = S.past[s], nkv = past + len;
        // the segment's inputs as dense doubles: q, dout (len, H, D); k, v (nkv, G, D)
        q.resize((size_t)len * H * D);
        dout.resize((size_t)len * H * D);
        k.resize((size_t)nkv * G * D);
        v.resize((size_t)nkv * G * D);
        for (int r = 0; r < len; ++r)
            for (int h = 0; h < H; ++h)
                for (int col = 0; col < D; ++col) {
                    q[((size_t)r * H + h) * D + col] = S.qv(s, r, h, col);
                    dout[((size_t)r * H + h) * D + col] = S.dov(s, r, h, col);
                }
        for (int j = 0; j < nkv; ++j)
            for (int g = 0; g < G; ++g)
                for (int col = 0; col < D; ++col) {
                    k[((size_t)j * G + g) * D + col] = S.kv(s, j, g, col);
                    v[((size_t)j * G + g) * D + col] = S.vv(s, j, g, col);
                }
        for (int h = 0; h < H; ++h) {
            const int g = h / group;
            for (int r = 0; r < len; ++r) {
                const double* qr = &q[((size_t)r * H + h) * D];
                const double* dor = &dout[((size_t)r * H + h) * D];
                const int qpos = past + r;
                const int lo = c.window == INT_MAX ? 0 : std::max(0, qpos - c.window + 1);
                const int nk = qpos - lo + 1;
                sc.assign(nk, 0);
                double m = -INFINITY;
                for (int j = lo; j <= qpos; ++j) {
                    const double* kj = &k[((size_t)j * G + g) * D];
                    double d = 0;
                    for (int col = 0; col < D; ++col) d += qr[col] * kj[col];
                    sc[j - lo] = d * scale;
                    m = std::max(m, sc[j - lo]);
                }
                double z = 0;
                for (double x : sc) z += std::exp(x - m);
                const double lse = m + std::log(z);
                pr.assign(nk, 0);
                for (int i = 0; i < nk; ++i) pr[i] = std::exp(sc[i] - lse);
                const size_t orow = (size_t)(S.q_row[s] + r) * H * D + (size_t)h * D;
                R.lse[(size_t)h * S.rows + S.q_row[s] + r] = lse;
                double* o = &R.out[orow];
                for (int j = lo; j <= qpos; ++j) {
                    const double* vj = &v[((size_t)j * G + g) * D];
                    for (int col = 0; col < D; ++col) o[col] += pr[j - lo] * vj[col];
                }
                // backward of Σ out · probe
                double delta = 0;
                for (int col = 0; col < D; ++col) delta += dor[col] * o[col];
                double* dq = &R.dq[orow];
                for (int j = lo; j <= qpos; ++j) {
                    const double* kj = &k[((size_t)j * G + g) * D];
                    const double* vj = &v[((size_t)j * G + g) * D];
                    double d = 0;
                    for (int col = 0; col < D; ++col) d += dor[col] * vj[col];
                    const double ds = pr[j - lo] * (d - delta);
                    double* dk = &R.dk[((kv_base + j) * G + g) * D];
                    double* dv = &R.dv[((kv_base + j) * G + g) * D];
                    for (int col = 0; col < D; ++col) {
                        dq[col] += scale * ds * kj[col];
                        dk[col] += scale * ds * qr[col];
                        dv[col] += pr[j - lo] * dor[col];
                    }
                }
            }
        }
        kv_base += nkv;
    }
    return R;
}

template <class T>
struct Outputs {
    std::vector<T> out;
    std::vector<float> lse, delta;
    std::vector<T> dq;                       // training: the dqkv buffer (dq, dk, dv inside)
    std::vector<std::vector<T>> dk, dv;      // generation: per segment
};

// A tensor's scale: its largest reference value, at least a tenth of the inputs' (which are
// N(0, 1)); with window = 1 the true dq and dk are exactly zero.
double scale_of(const std::vector<double>& v) { return std::max(max_abs_of(v), 0.1); }

template <class T>
T sentinel() {
    return DT<T>::make(-777.0f);
}

template <class T>
void run_backward(const Setup<T>& S, Variant var, Outputs<T>& O) {
    const Case& c = S.c;
    const int block = (var == Variant::TC && !std::is_same<T, float>::value) ? 128 : 256;
    O.delta.assign((size_t)c.heads * S.lse_stride, -777.f);
    O.dq.assign((size_t)S.rows * S.dq_stride, sentinel<T>());
    O.dk.clear();
    O.dv.clear();
    std::vector<AttnSeg<T>> segs(S.n_segs);
    for (int s = 0; s < S.n_segs; ++s) {
        segs[s] = AttnSeg<T>{S.kptr(s), S.vptr(s), nullptr, nullptr, S.q_row[s], c.lens[s], S.past[s], S.kv_stride};
        if (c.generation) {
            O.dk.emplace_back((size_t)(S.past[s] + c.lens[s]) * S.kv_stride, sentinel<T>());
            O.dv.emplace_back((size_t)(S.past[s] + c.lens[s]) * S.kv_stride, sentinel<T>());
        }
    }
    for (int s = 0; s < S.n_segs; ++s) {
        if (c.generation) {
            segs[s].dk = O.dk[s].data();
            segs[s].dv = O.dv[s].data();
        } else {
            segs[s].dk = O.dq.data() + (size_t)S.q_row[s] * S.dq_stride + (size_t)c.heads * c.D;
            segs[s].dv = O.dq.data() + (size_t)S.q_row[s] * S.dq_stride + (size_t)(c.heads + c.kv_heads) * c.D;
        }
    }
    AttnBwdParams<T> p{};
    p.q = S.qbuf.data();
    p.out = O.out.data();
    p.dout = S.probe.data();
    p.lse = O.lse.data();
    p.delta = O.delta.data();
    p.dq = O.dq.data();
    p.segs = segs.data();
    p.q_stride = S.q_stride;
    p.out_stride = S.out_stride;
    p.dq_stride = S.dq_stride;
    p.lse_stride = S.lse_stride;
    p.n_segs = S.n_segs;
    p.n_rows = S.q_row.back() + c.lens.back();
    p.heads = c.heads;
    p.kv_heads = c.kv_heads;
    p.head_dim = c.D;
    p.window = c.window;
    p.scale = (float)(1.0 / std::sqrt((double)c.D));
    const unsigned qt = (unsigned)((S.max_len() + kTile - 1) / kTile);
    const unsigned kt = (unsigned)((S.max_kv() + kTile - 1) / kTile);
    if (var == Variant::SIMT) {
        FT_LAUNCH(attn_bwd_dot_simt, T, (unsigned)p.n_rows, 1, 1, 128, p);
        FT_LAUNCH(attn_bwd_dkdv_simt, T, kt, c.kv_heads, S.n_segs, block, p);
        FT_LAUNCH(attn_bwd_dq_simt, T, qt, c.heads, S.n_segs, block, p);
    } else {
        FT_LAUNCH(attn_bwd_dot, T, (unsigned)p.n_rows, 1, 1, 128, p);
        FT_LAUNCH(attn_bwd_dkdv, T, kt, c.kv_heads, S.n_segs, block, p);
        FT_LAUNCH(attn_bwd_dq, T, qt, c.heads, S.n_segs, block, p);
    }
}

template <class T>
void run_variant(const Case& c, const Setup<T>& S, const Ref& R, Variant var) {
    const int H = c.heads, G = c.kv_heads, D = c.D;
    const bool is_f32 = std::is_same<T, float>::value;
    const char* vname = var == Variant::TC ? (is_f32 ? "attn_*_f32" : "tensor-core") : "simt";
    const int block = (var == Variant::TC && !is_f32) ? 128 : 256;
    std::string lens;
    for (size_t i = 0; i < c.lens.size(); ++i)
        lens += fmt("%s%d%s", i ? "," : "", c.lens[i], S.past[i] ? fmt("+past%d", S.past[i]).c_str() : "");
    const std::string tag = fmt("%s %s %s: segs [%s] heads %d/%d d=%d%s%s", c.name.c_str(), DT<T>::name, vname, lens.c_str(), H, G,
                                D, c.window == INT_MAX ? "" : fmt(" window=%d", c.window).c_str(),
                                c.generation ? " separate-kv" : "");

    // forward
    Outputs<T> O;
    O.out.assign((size_t)S.rows * S.out_stride, sentinel<T>());
    O.lse.assign((size_t)H * S.lse_stride, -777.f);
    std::vector<AttnSeg<T>> segs(S.n_segs);
    for (int s = 0; s < S.n_segs; ++s)
        segs[s] = AttnSeg<T>{S.kptr(s), S.vptr(s), nullptr, nullptr, S.q_row[s], c.lens[s], S.past[s], S.kv_stride};
    AttnFwdParams<T> fp{};
    fp.q = S.qbuf.data();
    fp.out = O.out.data();
    fp.lse = O.lse.data();
    fp.segs = segs.data();
    fp.q_stride = S.q_stride;
    fp.out_stride = S.out_stride;
    fp.lse_stride = S.lse_stride;
    fp.n_segs = S.n_segs;
    fp.heads = H;
    fp.kv_heads = G;
    fp.head_dim = D;
    fp.window = c.window;
    fp.scale = (float)(1.0 / std::sqrt((double)D));
    const unsigned qt = (unsigned)((S.max_len() + kTile - 1) / kTile);
    if (var == Variant::SIMT) FT_LAUNCH(attn_fwd_simt, T, qt, H, S.n_segs, block, fp);
    else FT_LAUNCH(attn_fwd, T, qt, H, S.n_segs, block, fp);

    const double rt_out = is_f32 ? 2e-5 : 1.5 * DT<T>::eps;
    const double rt_grad = is_f32 ? 2e-5 : 2 * DT<T>::eps;
    std::vector<bool> seg_row(S.rows, false);
    for (int s = 0; s < S.n_segs; ++s)
        for (int r = 0; r < c.lens[s]; ++r) seg_row[S.q_row[s] + r] = true;
    {
        Cmp co(tag + " out", rt_out, scale_of(R.out));
        bool untouched = true;
        for (int row = 0; row < S.rows; ++row)
            for (int e = 0; e < S.out_stride; ++e) {
                const T& got = O.out[(size_t)row * S.out_stride + e];
                if (seg_row[row] && e < H * D) co.add(DT<T>::val(got), R.out[(size_t)row * H * D + e]);
                else untouched &= same_bits(got, sentinel<T>());
            }
        co.done();
        Cmp cl(tag + " lse", 1e-5, 1.0);
        for (int h = 0; h < H; ++h)
            for (int row = 0; row < S.lse_stride; ++row) {
                const float got = O.lse[(size_t)h * S.lse_stride + row];
                if (row < S.rows && seg_row[row]) cl.add(got, R.lse[(size_t)h * S.rows + row]);
                else untouched &= got == -777.f;
            }
        cl.done();
        expect(untouched, tag + " fwd: nothing written outside the segments' rows and heads");
    }

    // backward, twice
    run_backward(S, var, O);
    Outputs<T> O2;
    O2.out = O.out;
    O2.lse = O.lse;
    run_backward(S, var, O2);
    bool same = std::memcmp(O.dq.data(), O2.dq.data(), O.dq.size() * sizeof(T)) == 0 && O.delta == O2.delta;
    for (size_t s = 0; s < O.dk.size(); ++s)
        same &= std::memcmp(O.dk[s].data(), O2.dk[s].data(), O.dk[s].size() * sizeof(T)) == 0 &&
                std::memcmp(O.dv[s].data(), O2.dv[s].data(), O.dv[s].size() * sizeof(T)) == 0;
    expect(same, tag + " bwd: a second run is bit-identical (deterministic)");

    Cmp cq(tag + " dq", rt_grad, scale_of(R.dq));
    Cmp ck(tag + " dk", rt_grad, scale_of(R.dk));
    Cmp cv(tag + " dv", rt_grad, scale_of(R.dv));
    bool untouched = true;
    for (int row = 0; row < S.rows; ++row)
        for (int e = 0; e < S.dq_stride; ++e) {
            const T& got = O.dq[(size_t)row * S.dq_stride + e];
            if (seg_row[row] && e < H * D) cq.add(DT<T>::val(got), R.dq[(size_t)row * H * D + e]);
            else if (!c.generation && seg_row[row] && e < (H + 2 * G) * D) continue;  // dk / dv, below
            else untouched &= same_bits(got, sentinel<T>());
        }
    size_t kv_base = 0;
    for (int s = 0; s < S.n_segs; ++s) {
        const int nkv = S.past[s] + c.lens[s];
        for (int j = 0; j < nkv; ++j)
            for (int e = 0; e < S.kv_stride; ++e) {
                const T* dk = c.generation ? O.dk[s].data() : O.dq.data() + (size_t)S.q_row[s] * S.dq_stride + (size_t)H * D;
                const T* dv = c.generation ? O.dv[s].data() : O.dq.data() + (size_t)S.q_row[s] * S.dq_stride + (size_t)(H + G) * D;
                if (e < G * D) {
                    ck.add(DT<T>::val(dk[(size_t)j * S.kv_stride + e]), R.dk[(kv_base + j) * G * D + e]);
                    cv.add(DT<T>::val(dv[(size_t)j * S.kv_stride + e]), R.dv[(kv_base + j) * G * D + e]);
                } else if (c.generation) {
                    untouched &= same_bits(O.dk[s][(size_t)j * S.kv_stride + e], sentinel<T>()) &&
                                 same_bits(O.dv[s][(size_t)j * S.kv_stride + e], sentinel<T>());
                }
            }
        kv_base += nkv;
    }
    cq.done();
    ck.done();
    cv.done();
    const int n_rows = S.q_row.back() + c.lens.back();  // attn_bwd_dot writes every row below
    for (int h = 0; h < H; ++h)
        for (int row = n_rows; row < S.lse_stride; ++row) untouched &= O.delta[(size_t)h * S.lse_stride + row] == -777.f;
    expect(untouched, tag + " bwd: nothing written outside the segments' rows and heads");
}

// One case in one dtype: inputs and the reference once, then each variant.
template <class T>
void run_case(const Case& c, uint64_t seed, std::vector<Variant> variants) {
    Rng rng(seed);
    Setup<T> S(c, rng);
    const Ref R = reference(S);
    for (Variant v : variants) run_variant(c, S, R, v);
}

// The reference's own gradient against central differences of Σ out · probe (f32 case,
// double arithmetic), so that a wrong reference cannot pass wrong kernels.
void check_reference_gradient() {
    Case c{"reference-check", {5, 9}, {0, 3}, 2, 1, 8, 6, true, 0};
    Rng rng(99);
    Setup<float> S(c, rng);
    const Ref R = reference(S);
    auto loss = [&](const Setup<float>& X) {
        Ref r = reference(X);
        double l = 0;
        for (int s = 0; s < X.n_segs; ++s)
            for (int row = 0; row < c.lens[s]; ++row)
                for (int e = 0; e < c.heads * c.D; ++e)
                    l += r.out[(size_t)(X.q_row[s] + row) * c.heads * c.D + e] *
                         (double)X.probe[(size_t)(X.q_row[s] + row) * X.out_stride + e];
        return l;
    };
    double worst = 0;
    const double h = 1e-3;
    // a few q, k and v entries
    for (int t = 0; t < 12; ++t) {
        Setup<float> P = S, M = S;
        double analytic;
        if (t % 3 == 0) {
            const int s = t % 2, r = t % c.lens[s], hh = t % c.heads, col = t % c.D;
            const size_t at = (size_t)(S.q_row[s] + r) * S.q_stride + (size_t)hh * c.D + col;
            P.qbuf[at] += (float)h;
            M.qbuf[at] -= (float)h;
            analytic = R.dq[(size_t)(S.q_row[s] + r) * c.heads * c.D + (size_t)hh * c.D + col];
        } else {
            const int s = t % 2, j = t % (S.past[s] + c.lens[s]), col = t % c.D;
            auto& buf = t % 3 == 1 ? P.kc[s] : P.vc[s];
            auto& bm = t % 3 == 1 ? M.kc[s] : M.vc[s];
            buf[(size_t)j * S.kv_stride + col] += (float)h;
            bm[(size_t)j * S.kv_stride + col] -= (float)h;
            const size_t base = s == 0 ? 0 : (size_t)(S.past[0] + c.lens[0]);
            analytic = (t % 3 == 1 ? R.dk : R.dv)[(base + j) * c.kv_heads * c.D + col];
        }
        const double numeric = (loss(P) - loss(M)) / (2 * h);
        worst = std::max(worst, std::fabs(numeric - analytic) / std::max(1.0, std::fabs(analytic)));
    }
    expect(worst < 1e-4, fmt("attention reference: analytic gradient vs central differences (worst %.2e)", worst));
}

// kv_append: every segment's new key and value rows land at rows past.. of its cache,
// bit-exact; the cache's other rows and its row padding keep their sentinel. The grid is
// smaller than (longest, segments), so both grid-stride loops are exercised.
template <class T>
void test_kv_append(uint64_t seed) {
    Rng rng(seed);
    const int heads = 4, kv_heads = 2, D = 24, W = kv_heads * D;
    const int q_stride = (heads + 2 * kv_heads) * D + 8, kv_stride = W + 4;
    const std::vector<int> lens = {1, 70, 3, 2}, pasts = {37, 0, 5, 1};
    int rows = 0;
    for (int l : lens) rows += l;
    const auto qkv = randn<T>(rng, (size_t)rows * q_stride);
    std::vector<std::vector<T>> kc, vc;
    std::vector<AttnSeg<T>> segs;
    for (size_t s = 0, q_row = 0; s < lens.size(); q_row += lens[s], ++s) {
        const size_t cap = (size_t)(pasts[s] + lens[s] + 2) * kv_stride;
        kc.emplace_back(cap, sentinel<T>());
        vc.emplace_back(cap, sentinel<T>());
        segs.push_back({kc[s].data(), vc[s].data(), kc[s].data(), vc[s].data(), (int)q_row, lens[s],
                        pasts[s], kv_stride});
    }
    AttnFwdParams<T> p{qkv.data(), nullptr, nullptr, segs.data(), q_stride, heads * D, rows,
                       (int)segs.size(), heads, kv_heads, D, INT_MAX, 1.f, 0};
    FT_LAUNCH(kv_append, T, 3, 2, 1, 32, p);
    bool ok = true;
    for (size_t s = 0; s < lens.size(); ++s)
        for (size_t i = 0; i < kc[s].size(); ++i) {
            const int r = (int)(i / kv_stride) - pasts[s], c = (int)(i % kv_stride);
            const bool fresh = r >= 0 && r < lens[s] && c < W;
            const size_t src = (size_t)(segs[s].q_row + r) * q_stride + heads * D + c;
            ok &= same_bits(kc[s][i], fresh ? qkv[src] : sentinel<T>());
            ok &= same_bits(vc[s][i], fresh ? qkv[src + W] : sentinel<T>());
        }
    expect(ok, fmt("kv_append %s segments 1/70/3/2 after pasts 37/0/5/1, grid 3x2: exact, the rest untouched",
                   DT<T>::name));
}

}  // namespace

void run_attention_tests(bool quick, const char* filter) {
    check_reference_gradient();
    test_kv_append<float>(7);
    test_kv_append<__half>(8);
    test_kv_append<__nv_bfloat16>(9);
    std::vector<Case> cases = {
        {"packed", {1, 2, 17, 64, 65, 300}, {}, 4, 2, 64, INT_MAX, false, 8, true, true},
        {"gqa-1", {17, 65, 130}, {}, 4, 1, 32, INT_MAX, false, 8},
        {"phi3-d96", {130, 1, 33}, {}, 2, 2, 96, INT_MAX, false, 8},
        {"window", {300, 65, 2}, {}, 2, 1, 32, 37, false, 8},
        {"generation", {5, 1, 20, 70}, {37, 100, 0, 64}, 4, 2, 64, INT_MAX, true, 8},
        {"generation-window", {3, 70}, {80, 10}, 2, 2, 96, 50, true, 8},
        {"d128", {70, 129}, {}, 2, 1, 128, INT_MAX, false, 8},
        {"d112-window", {150}, {}, 1, 1, 112, 40, false, 16},
        {"d80", {100, 7}, {}, 3, 3, 80, INT_MAX, false, 8},
        {"unaligned-rows", {33, 66}, {}, 3, 1, 48, INT_MAX, false, 2},
        {"simt-d40", {50, 9}, {}, 2, 1, 40, 20, false, 2, false},
        {"long", {2100}, {}, 1, 1, 16, 2047, false, 8},
    };
    // windows around the tile edges (16, 32, 64 rows), each query alone (1), with a past
    for (int w : {1, 2, 15, 17, 33, 34, 63, 66, 130}) {
        cases.push_back({fmt("window-sweep-%d", w), {200}, {}, 1, 1, 16, w, false, 8});
        if (w == 34 || w == 66)
            cases.push_back({fmt("window-sweep-past-%d", w), {70, 9}, {29, 100}, 2, 1, 16, w, true, 8});
    }
    cases.push_back({"window-sweep-d128-18", {150}, {}, 1, 1, 128, 18, false, 8});
    // one job per case and dtype, run by a pool of threads (several kernels launching at
    // once: the emulator is per host thread); the output is printed in job order
    std::vector<std::function<void()>> jobs;
    uint64_t seed = 1000;
    for (const Case& c : cases) {
        ++seed;
        if (quick && c.name == "long") continue;
        if (filter && c.name.find(filter) == std::string::npos) continue;
        // f32: attn_*_f32 is the SIMT code; its attn_*_simt_f32 names are run once
        std::vector<Variant> f32v = {Variant::TC};
        if (c.simt_names_f32) f32v.push_back(Variant::SIMT);
        std::vector<Variant> lowv = {Variant::SIMT};
        if (c.tc) lowv.insert(lowv.begin(), Variant::TC);
        jobs.push_back([c, seed, f32v] { run_case<float>(c, seed, f32v); });
        jobs.push_back([c, seed, lowv] { run_case<__half>(c, seed, lowv); });
        jobs.push_back([c, seed, lowv] { run_case<__nv_bfloat16>(c, seed, lowv); });
    }
    int threads = (int)std::thread::hardware_concurrency();
    if (const char* e = std::getenv("FT_EMU_TEST_THREADS")) threads = std::atoi(e);
    threads = std::max(1, std::min(threads, 16));
    std::vector<std::string> outs(jobs.size());
    std::vector<char> done(jobs.size(), 0);
    std::atomic<size_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&] {
            for (size_t i; (i = next++) < jobs.size();) {
                sink() = &outs[i];
                jobs[i]();
                sink() = nullptr;
                std::lock_guard<std::mutex> lock(mu);
                done[i] = 1;
                cv.notify_all();
            }
        });
    for (size_t i = 0; i < jobs.size(); ++i) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return done[i] != 0; });
        std::fputs(outs[i].c_str(), stdout);
        std::fflush(stdout);
    }
    for (auto& t : pool) t.join();
}
