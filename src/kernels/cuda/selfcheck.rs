//! Every GPU primitive against its CPU twin, on random inputs, as a list of named checks
//! with their shapes, error and tolerance. The Rust tests run it on the emulated GPU (CI);
//! `ferrotune._core._gpu_selfcheck` runs it on a real one (`pytest -m gpu`,
//! `scripts/gpu_check.sh`), each check on its own so one failure does not hide the others.
//!
//! Tolerances are relative to the largest magnitude of the CPU result: f32 2e-5 (the same
//! maths in another summation order), bf16 2e-2 and fp16 4e-3 (one rounding of the output
//! type, plus the inputs' rounding for products); attention and the cross-entropy get 2–4×
//! that (long dot products in the tile order of the kernels).

use serde::Serialize;

use crate::error::{Error, Result};
use crate::kernels::cpu::Cpu;
use crate::kernels::{AdamWStep, Backend, Buf, Dt, Heads, KvCache, Layout, Mat, RopeSpec};

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub dtype: String,
    pub shapes: String,
    /// Largest |gpu − cpu| over the largest |cpu|.
    pub error: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// Why it could not run (an error from the device), if so.
    pub failure: Option<String>,
}

/// How big the cases are: `full` adds Phi-3's sizes (segments of 2047 and 4096 tokens,
/// head_dim 96 with 32 heads, widths 3072 / 8192, vocab 32064) for a real GPU.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub full: bool,
}

pub(crate) fn rand(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// The largest |a − b| relative to the largest |b|.
pub(crate) fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    (a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale) as f64
}

/// Tolerance (relative to the output's scale) for results computed in `act`.
pub(crate) fn tol(act: Dt) -> f64 {
    match act {
        Dt::F32 => 2e-5,
        Dt::BF16 => 2e-2,
        _ => 4e-3,
    }
}

/// `v` rounded to `act` (what a GPU buffer of that type holds), as f32.
pub(crate) fn rounded(v: &[f32], act: Dt) -> Vec<f32> {
    match act {
        Dt::BF16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        Dt::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// `v` rounded to `act`, on the CPU (f32) and on `g` (act).
fn both(g: &dyn Backend, act: Dt, v: &[f32]) -> Result<(Buf, Buf)> {
    let r = rounded(v, act);
    Ok((Cpu.upload_f32(&r, Dt::F32)?, g.upload_f32(&r, act)?))
}

/// One case's measured error against its tolerance.
struct Outcome {
    error: f64,
    tolerance: f64,
    shapes: String,
}

fn outcome(error: f64, tolerance: f64, shapes: String) -> Result<Vec<(String, Outcome)>> {
    Ok(vec![(
        String::new(),
        Outcome {
            error,
            tolerance,
            shapes,
        },
    )])
}

/// Runs every check on `g` (a GPU backend computing in `g.act()`), or those whose name
/// contains `only`.
pub fn run(g: &dyn Backend, sizes: Sizes, only: Option<&str>) -> Vec<Check> {
    type Case = fn(&dyn Backend, Dt, Sizes) -> Result<Vec<(String, Outcome)>>;
    let cases: &[(&str, Case)] = &[
        ("matmul", matmul),
        ("rms_norm", rms_norm),
        ("swiglu", swiglu),
        ("dropout", dropout_mask),
        ("rope", rope),
        ("attention", attention),
        ("attention_cached", attention_cached),
        ("cross_entropy", cross_entropy),
        ("adamw", adamw),
    ];
    let act = g.act();
    let mut out = Vec::new();
    for &(name, case) in cases {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(g, act, sizes)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                Err(Error::Compute(format!("panicked: {msg}")))
            });
        match got {
            Ok(parts) => {
                for (part, o) in parts {
                    out.push(Check {
                        name: if part.is_empty() {
                            name.to_string()
                        } else {
                            format!("{name}/{part}")
                        },
                        dtype: format!("{act:?}").to_lowercase(),
                        shapes: o.shapes,
                        passed: o.error <= o.tolerance,
                        error: o.error,
                        tolerance: o.tolerance,
                        failure: None,
                    })
                }
            }
            Err(e) => out.push(Check {
                name: name.to_string(),
                dtype: format!("{act:?}").to_lowercase(),
                shapes: String::new(),
                error: f64::INFINITY,
                tolerance: tol(act),
                passed: false,
                failure: Some(e.to_string()),
            }),
        }
    }
    out
}

/// Every transpose combination, written and accumulated (at an offset, into f32).
fn matmul(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let (m, k, n) = if s.full { (300, 3072, 520) } else { (5, 7, 3) };
    let mut out = Vec::new();
    let (a, b) = (rand(m * k, 1), rand(k * n, 2));
    let (ca, ga) = both(g, act, &a)?;
    let (cb, gb) = both(g, act, &b)?;
    for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
        let ma = |buf| {
            if at {
                Mat::of(buf, k, m).t()
            } else {
                Mat::of(buf, m, k)
            }
        };
        let mb = |buf| {
            if bt {
                Mat::of(buf, n, k).t()
            } else {
                Mat::of(buf, k, n)
            }
        };
        let want = Cpu.to_f32(&Cpu.matmul(ma(&ca), mb(&cb), 0.5, Dt::F32)?)?;
        let got = g.to_f32(&g.matmul(ma(&ga), mb(&gb), 0.5, Dt::F32)?)?;
        // products of the rounded inputs, f32 accumulation: f32-like error
        let t = if act == Dt::F32 { 1e-3 } else { 1e-4 };
        let shapes = format!("{m}x{k} @ {k}x{n}, transposes {at}/{bt}");
        out.push((
            format!(
                "{}{}",
                if at { "T" } else { "N" },
                if bt { "T" } else { "N" }
            ),
            Outcome {
                error: rel_err(&got, &want),
                tolerance: t,
                shapes: shapes.clone(),
            },
        ));
        let base = rand(3 + m * n, 3);
        let mut cd = Cpu.upload_f32(&base, Dt::F32)?;
        let mut gd = g.upload_f32(&base, Dt::F32)?;
        Cpu.matmul_acc(&mut cd, 3, ma(&ca), mb(&cb), 2.0)?;
        g.matmul_acc(&mut gd, 3, ma(&ga), mb(&gb), 2.0)?;
        let (w, got) = (Cpu.to_f32(&cd)?, g.to_f32(&gd)?);
        let untouched = got[..3] == base[..3];
        out.push((
            format!(
                "acc{}{}",
                if at { "T" } else { "N" },
                if bt { "T" } else { "N" }
            ),
            Outcome {
                error: if untouched {
                    rel_err(&got, &w)
                } else {
                    f64::INFINITY
                },
                tolerance: t,
                shapes: shapes + " accumulated at offset 3",
            },
        ));
    }
    Ok(out)
}

fn rms_norm(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let (rows, width) = if s.full { (64, 3072) } else { (6, 48) };
    let x = rand(rows * width, 4);
    let w: Vec<f32> = rand(width, 5).iter().map(|v| v + 1.0).collect();
    let dy = rand(rows * width, 6);
    let (cx, gx) = both(g, act, &x)?;
    let (cw, gw) = both(g, act, &w)?;
    let (cdy, gdy) = both(g, act, &dy)?;
    let (cy, cr) = Cpu.rms_norm(&cx, &cw, 1e-5)?;
    let (gy, gr) = g.rms_norm(&gx, &gw, 1e-5)?;
    let shapes = format!("{rows}x{width}");
    let mut out = vec![
        (
            "forward".into(),
            Outcome {
                error: rel_err(&g.to_f32(&gy)?, &Cpu.to_f32(&cy)?),
                tolerance: tol(act),
                shapes: shapes.clone(),
            },
        ),
        (
            "rstd".into(),
            Outcome {
                error: rel_err(&g.to_f32(&gr)?, &Cpu.to_f32(&cr)?),
                tolerance: 1e-5,
                shapes: shapes.clone(),
            },
        ),
    ];
    let dx0 = rounded(&dy, act);
    let mut cdx = Cpu.upload_f32(&dx0, Dt::F32)?;
    let mut gdx = g.upload_f32(&dx0, act)?;
    Cpu.rms_norm_bwd(&cx, &cw, &cr, &cdy, &mut cdx, true)?;
    g.rms_norm_bwd(&gx, &gw, &gr, &gdy, &mut gdx, true)?;
    out.push((
        "backward".into(),
        Outcome {
            error: rel_err(&g.to_f32(&gdx)?, &Cpu.to_f32(&cdx)?),
            tolerance: tol(act),
            shapes: shapes + " accumulated",
        },
    ));
    Ok(out)
}

fn swiglu(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let (rows, inter) = if s.full { (64, 8192) } else { (6, 40) };
    let gu = rand(rows * 2 * inter, 7);
    let d = rand(rows * inter, 8);
    let (cgu, ggu) = both(g, act, &gu)?;
    let (cd, gd) = both(g, act, &d)?;
    let shapes = format!("{rows}x(2·{inter})");
    Ok(vec![
        (
            "forward".into(),
            Outcome {
                error: rel_err(
                    &g.to_f32(&g.swiglu(&ggu, inter)?)?,
                    &Cpu.to_f32(&Cpu.swiglu(&cgu, inter)?)?,
                ),
                tolerance: tol(act),
                shapes: shapes.clone(),
            },
        ),
        (
            "backward".into(),
            Outcome {
                error: rel_err(
                    &g.to_f32(&g.swiglu_bwd(&ggu, &gd, inter)?)?,
                    &Cpu.to_f32(&Cpu.swiglu_bwd(&cgu, &cd, inter)?)?,
                ),
                tolerance: tol(act),
                shapes,
            },
        ),
    ])
}

/// The same mask on both devices (any difference in which elements survive is an error).
fn dropout_mask(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let n = if s.full { 1 << 20 } else { 300 };
    let x = rand(n, 9);
    let (cx, gx) = both(g, act, &x)?;
    let c = Cpu.to_f32(&Cpu.dropout(&cx, 0.3, 99)?)?;
    let d = g.to_f32(&g.dropout(&gx, 0.3, 99)?)?;
    let same_mask = c.iter().zip(&d).all(|(a, b)| (*a == 0.0) == (*b == 0.0));
    outcome(
        if same_mask {
            rel_err(&d, &c)
        } else {
            f64::INFINITY
        },
        tol(act),
        format!("{n} elements, p 0.3"),
    )
}

/// Segments, positions and RoPE tables (two tables, attention factor 1.1).
pub(crate) fn layout_for(
    be: &dyn Backend,
    lens: &[usize],
    heads: Heads,
    window: usize,
) -> Result<Layout> {
    layout_after(be, lens, &vec![0; lens.len()], heads, window)
}

/// [`layout_for`] with segments that continue cached sequences of `pasts` tokens.
fn layout_after(
    be: &dyn Backend,
    lens: &[usize],
    pasts: &[usize],
    heads: Heads,
    window: usize,
) -> Result<Layout> {
    let mut segs = Vec::new();
    let mut pos = Vec::new();
    let mut start = 0;
    for (&l, &past) in lens.iter().zip(pasts) {
        segs.push((start, l));
        pos.extend((0..l).map(|p| (past + p) as i32 + 3));
        start += l;
    }
    let half = heads.dim / 2;
    let table = |f: f32| -> Vec<f32> {
        (0..half)
            .map(|i| f / 10000f32.powf(2.0 * i as f32 / heads.dim as f32))
            .collect()
    };
    let inv = vec![table(1.0), table(0.5)];
    let tab: Vec<i32> = (0..pos.len()).map(|i| (i % 2) as i32).collect();
    be.layout(
        segs,
        pasts.to_vec(),
        window,
        heads,
        RopeSpec {
            pos: &pos,
            tab: &tab,
            inv_freq: &inv,
            mscale: 1.1,
        },
    )
}

fn attention_cases(s: Sizes) -> Vec<(Vec<usize>, Heads, usize)> {
    let mut v = vec![
        (
            vec![1, 2, 17, 65, 40],
            Heads {
                q: 4,
                kv: 2,
                dim: 16,
            },
            usize::MAX,
        ),
        (
            vec![1, 2, 17, 65, 40],
            Heads {
                q: 2,
                kv: 1,
                dim: 32,
            },
            9,
        ),
        (
            vec![3, 70],
            Heads {
                q: 2,
                kv: 2,
                dim: 96,
            },
            30,
        ),
    ];
    if s.full {
        v.push((
            vec![1, 2047, 4096],
            Heads {
                q: 4,
                kv: 2,
                dim: 96,
            },
            2047,
        ));
        v.push((
            vec![700, 1300],
            Heads {
                q: 32,
                kv: 32,
                dim: 96,
            },
            2047,
        ));
    }
    v
}

fn rope(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let mut out = Vec::new();
    for (lens, heads, window) in attention_cases(s) {
        let n: usize = lens.iter().sum();
        let (cl, gl) = (
            layout_for(&Cpu, &lens, heads, window)?,
            layout_for(g, &lens, heads, window)?,
        );
        let qkv = rand(n * heads.qkv_width(), 10);
        let (mut cq, mut gq) = both(g, act, &qkv)?;
        Cpu.rope(&mut cq, &cl, false)?;
        g.rope(&mut gq, &gl, false)?;
        let shapes = format!("{n} rows, {heads:?}");
        out.push((
            format!("forward {}x{}", heads.q, heads.dim),
            Outcome {
                error: rel_err(&g.to_f32(&gq)?, &Cpu.to_f32(&cq)?),
                tolerance: tol(act),
                shapes: shapes.clone(),
            },
        ));
        // the backward rotation (the transpose) undoes the forward one up to the attention
        // factor applied twice on q and k
        let mut back = g.upload_f32(&g.to_f32(&gq)?, act)?;
        g.rope(&mut back, &gl, true)?;
        let rotated = (heads.q + heads.kv) * heads.dim;
        let want: Vec<f32> = rounded(&qkv, act)
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if i % heads.qkv_width() < rotated {
                    v * 1.21
                } else {
                    v
                }
            })
            .collect();
        out.push((
            format!("backward {}x{}", heads.q, heads.dim),
            Outcome {
                error: rel_err(&g.to_f32(&back)?, &want),
                tolerance: 2.0 * tol(act),
                shapes,
            },
        ));
    }
    Ok(out)
}

fn attention(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let mut out = Vec::new();
    for (lens, heads, window) in attention_cases(s) {
        let n: usize = lens.iter().sum();
        let (cl, gl) = (
            layout_for(&Cpu, &lens, heads, window)?,
            layout_for(g, &lens, heads, window)?,
        );
        let qkv = rand(n * heads.qkv_width(), 11);
        let (cq, gq) = both(g, act, &qkv)?;
        let (co, _) = Cpu.attention(&cq, &cl, None, 0)?;
        let (go, glse) = g.attention(&gq, &gl, None, 0)?;
        let what = format!(
            "segments {lens:?}, heads {}/{} × {}, window {}",
            heads.q,
            heads.kv,
            heads.dim,
            if window == usize::MAX {
                "none".to_string()
            } else {
                window.to_string()
            }
        );
        let tag = format!("{}x{}w{}", heads.q, heads.dim, window.min(99_999));
        out.push((
            format!("forward {tag}"),
            Outcome {
                error: rel_err(&g.to_f32(&go)?, &Cpu.to_f32(&co)?),
                tolerance: 2.0 * tol(act),
                shapes: what.clone(),
            },
        ));
        let dout = rand(n * heads.q * heads.dim, 12);
        let (cdo, gdo) = both(g, act, &dout)?;
        let cd = Cpu.attention_bwd(&cq, &co, None, &cdo, &cl)?;
        let gd = g.attention_bwd(&gq, &go, glse.as_ref(), &gdo, &gl)?;
        let gd1 = g.to_f32(&gd)?;
        // deterministic: the same bits again
        let again = g.to_f32(&g.attention_bwd(&gq, &go, glse.as_ref(), &gdo, &gl)?)?;
        out.push((
            format!("backward {tag}"),
            Outcome {
                error: if again == gd1 {
                    rel_err(&gd1, &Cpu.to_f32(&cd)?)
                } else {
                    f64::INFINITY
                },
                tolerance: 4.0 * tol(act),
                shapes: what + " (and bit-identical when run again)",
            },
        ));
    }
    Ok(out)
}

/// Generation's attention: prompts of several lengths, then decoding steps and a continued
/// prompt, each appending to per-sequence KV caches that start too small (so they grow);
/// every step's output and, at the end, the caches' keys and values against the CPU's.
fn attention_cached(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let heads = Heads {
        q: 4,
        kv: 2,
        dim: if s.full { 96 } else { 16 },
    };
    let kvw = heads.kv * heads.dim;
    let steps: [&[usize]; 4] = [&[5, 17, 1], &[1, 1, 1], &[1, 3, 70], &[1, 1, 1]];
    let mut cc: Vec<KvCache> = (0..3)
        .map(|_| KvCache::new(&Cpu, 1, kvw, 4))
        .collect::<Result<_>>()?;
    let mut gc: Vec<KvCache> = (0..3)
        .map(|_| KvCache::new(g, 1, kvw, 4))
        .collect::<Result<_>>()?;
    let mut error = 0f64;
    for (i, lens) in steps.iter().enumerate() {
        let pasts: Vec<usize> = cc.iter().map(|c| c.len).collect();
        let n: usize = lens.iter().sum();
        let qkv = rand(n * heads.qkv_width(), 40 + i as u64);
        let (cq, gq) = both(g, act, &qkv)?;
        let cl = layout_after(&Cpu, lens, &pasts, heads, 50)?;
        let gl = layout_after(g, lens, &pasts, heads, 50)?;
        let (co, _) = Cpu.attention(&cq, &cl, Some(&mut cc.iter_mut().collect::<Vec<_>>()), 0)?;
        let (go, _) = g.attention(&gq, &gl, Some(&mut gc.iter_mut().collect::<Vec<_>>()), 0)?;
        error = error.max(rel_err(&g.to_f32(&go)?, &Cpu.to_f32(&co)?));
        for (j, &len) in lens.iter().enumerate() {
            cc[j].len = pasts[j] + len;
            gc[j].len = pasts[j] + len;
        }
    }
    let mut cache_error = 0f64;
    for (c, gcache) in cc.iter().zip(&gc) {
        for (cb, gb) in [
            (&c.layers[0].0, &gcache.layers[0].0),
            (&c.layers[0].1, &gcache.layers[0].1),
        ] {
            let rows = c.len * kvw;
            let want = Cpu.to_f32(cb)?;
            let got = g.to_f32(gb)?;
            cache_error = cache_error.max(rel_err(&got[..rows], &want[..rows]));
        }
    }
    let shapes = format!(
        "3 sequences, steps {steps:?}, heads 4/2 × {}, window 50",
        heads.dim
    );
    Ok(vec![
        (
            "cached forward".into(),
            Outcome {
                error,
                tolerance: 2.0 * tol(act),
                shapes: shapes.clone(),
            },
        ),
        (
            "cache contents".into(),
            Outcome {
                error: cache_error,
                // the same inputs rounded to `act`, copied
                tolerance: 0.0,
                shapes,
            },
        ),
    ])
}

fn cross_entropy(g: &dyn Backend, act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let (rows, hidden, vocab) = if s.full {
        (300, 3072, 32064)
    } else {
        (9, 32, 301)
    };
    let h = rand(rows * hidden, 20);
    let w: Vec<f32> = rand(vocab * hidden, 21).iter().map(|v| v * 0.1).collect();
    let t: Vec<i32> = (0..rows as i32)
        .map(|i| (i * 37 + 5) % vocab as i32)
        .collect();
    let (ch, gh) = both(g, act, &h)?;
    let (cw, gw) = both(g, act, &w)?;
    let (ct, gt) = (Cpu.upload_i32(&t)?, g.upload_i32(&t)?);
    let mut cl = Cpu.zeros(1, Dt::F64)?;
    let mut gl = g.zeros(1, Dt::F64)?;
    let cd = Cpu.cross_entropy(&ch, &cw, &ct, Some(0.25), &mut cl)?;
    let gd = g.cross_entropy(&gh, &gw, &gt, Some(0.25), &mut gl)?;
    let (a, b) = (g.to_f64(&gl)?[0], Cpu.to_f64(&cl)?[0]);
    let shapes = format!("{rows} rows x {hidden}, vocab {vocab}");
    let (cd, gd) = match (cd, gd) {
        (Some(c), Some(d)) => (Cpu.to_f32(&c)?, g.to_f32(&d)?),
        _ => return Err(Error::Compute("no gradient returned".into())),
    };
    Ok(vec![
        (
            "loss".into(),
            Outcome {
                error: (a - b).abs() / b.abs(),
                tolerance: 10.0 * tol(act),
                shapes: shapes.clone(),
            },
        ),
        (
            "dh".into(),
            Outcome {
                error: rel_err(&gd, &cd),
                tolerance: 4.0 * tol(act),
                shapes,
            },
        ),
    ])
}

/// The squared norm and AdamW: f32 on every device.
fn adamw(g: &dyn Backend, _act: Dt, s: Sizes) -> Result<Vec<(String, Outcome)>> {
    let n = if s.full { 25_000_000 } else { 1000 };
    let (p0, grads) = (rand(n, 30), rand(n, 31));
    let mut cp = Cpu.upload_f32(&p0, Dt::F32)?;
    let mut gp = g.upload_f32(&p0, Dt::F32)?;
    let (cg, gg) = (
        Cpu.upload_f32(&grads, Dt::F32)?,
        g.upload_f32(&grads, Dt::F32)?,
    );
    let (mut cm, mut cv) = (Cpu.zeros(n, Dt::F32)?, Cpu.zeros(n, Dt::F32)?);
    let (mut gm, mut gv) = (g.zeros(n, Dt::F32)?, g.zeros(n, Dt::F32)?);
    let (mut cs, mut gs) = (Cpu.zeros(2, Dt::F64)?, g.zeros(2, Dt::F64)?);
    Cpu.sum_into(&cg, true, &mut cs, 1)?;
    g.sum_into(&gg, true, &mut gs, 1)?;
    let (a, b) = (g.to_f64(&gs)?[1], Cpu.to_f64(&cs)?[1]);
    // the reduction's order is fixed (reduce.cu): the same bits every time on a GPU too
    let mut repeats = true;
    for _ in 0..3 {
        let mut again = g.zeros(2, Dt::F64)?;
        g.sum_into(&gg, true, &mut again, 1)?;
        repeats &= g.to_f64(&again)?[1].to_bits() == a.to_bits();
    }
    let step = AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        bc1: 0.1,
        bc2_sqrt: 0.001f32.sqrt(),
        grad_scale: 0.5,
        max_norm: 1.0,
    };
    let (mut cst, mut gst) = (Cpu.zeros(1, Dt::I32)?, g.zeros(1, Dt::I32)?);
    Cpu.adamw(&mut cp, &cg, &mut cm, &mut cv, step, (&cs, 1), &mut cst)?;
    g.adamw(&mut gp, &gg, &mut gm, &mut gv, step, (&gs, 1), &mut gst)?;
    let shapes = format!("{n} parameters, clipped, grad scale 0.5");
    Ok(vec![
        (
            "norm".into(),
            Outcome {
                error: if repeats {
                    (a - b).abs() / b
                } else {
                    f64::INFINITY
                },
                tolerance: 1e-9,
                shapes: format!("{n} values (and bit-identical when run again)"),
            },
        ),
        (
            "update".into(),
            Outcome {
                error: rel_err(&g.to_f32(&gp)?, &Cpu.to_f32(&cp)?),
                tolerance: 1e-6,
                shapes,
            },
        ),
    ])
}
