//! The GPU backend on the emulated GPU against the CPU backend: every primitive on random
//! inputs, in f32 (tight tolerances: the same maths, other summation orders) and in bf16 /
//! fp16 (the tolerances of one rounding of the output type, or of the inputs' rounding for
//! products), then the whole model. The kernels run from the same CUDA sources a GPU runs.

use std::sync::Arc;

use super::emu::Emu;
use super::Gpu;
use crate::kernels::cpu::Cpu;
use crate::kernels::{Backend, Buf, Dt, Heads, Mat, RopeSpec};

fn rand(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

fn gpu(act: Dt) -> Gpu {
    Gpu::new(Arc::new(Emu::new((8, 0))), act, "emu".into())
}

/// The largest |a − b| relative to the largest |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Tolerance (relative to the output's scale) for results computed in `act`.
fn tol(act: Dt) -> f32 {
    match act {
        Dt::F32 => 2e-5,
        Dt::BF16 => 2e-2,
        Dt::F16 => 4e-3,
        _ => unreachable!(),
    }
}

const ACTS: [Dt; 3] = [Dt::F32, Dt::BF16, Dt::F16];

/// `v` rounded to `act` (what a GPU buffer of that type holds), as f32.
fn rounded(v: &[f32], act: Dt) -> Vec<f32> {
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
fn both(g: &Gpu, act: Dt, v: &[f32]) -> (Buf, Buf) {
    let r = rounded(v, act);
    (
        Cpu.upload_f32(&r, Dt::F32).unwrap(),
        g.upload_f32(&r, act).unwrap(),
    )
}

#[test]
fn parameter_structs_match_the_c_layouts() {
    use super::params as p;
    use std::mem::size_of;
    let sizes: &[(&str, usize)] = &[
        ("rms_norm_fwd_bf16", size_of::<p::RmsNormFwd>()),
        ("rms_norm_bwd_f16", size_of::<p::RmsNormBwd>()),
        ("rope_f32", size_of::<p::Rope>()),
        ("swiglu_fwd_bf16", size_of::<p::Swiglu>()),
        ("swiglu_bwd_f32", size_of::<p::Swiglu>()),
        ("dropout_bf16", size_of::<p::Dropout>()),
        ("cast_f32_to_bf16", size_of::<p::Cast>()),
        ("add_f16", size_of::<p::Add>()),
        ("copy_rows_bf16", size_of::<p::CopyRows>()),
        ("gather_rows_f32", size_of::<p::Rows>()),
        ("scatter_rows_bf16", size_of::<p::Rows>()),
        ("ce_rows_bf16", size_of::<p::CeRows>()),
        ("sum_f32", size_of::<p::Sum>()),
        ("adamw_f32", size_of::<p::AdamW>()),
        ("attn_fwd_bf16", size_of::<p::AttnFwd>()),
        ("attn_fwd_simt_f16", size_of::<p::AttnFwd>()),
        ("attn_bwd_dot_simt_bf16", size_of::<p::AttnBwd>()),
        ("attn_bwd_dkdv_bf16", size_of::<p::AttnBwd>()),
        ("attn_bwd_dq_f16", size_of::<p::AttnBwd>()),
    ];
    for &(name, rust) in sizes {
        let c = Emu::params_size(name).unwrap_or_else(|| panic!("no kernel {name}"));
        assert_eq!(c as usize, rust, "{name}");
    }
    assert_eq!(size_of::<p::AttnSeg>(), 48);
}

#[test]
fn products_follow_the_row_major_contract_through_the_cublas_mapping() {
    // every transpose combination, write and accumulate, with an offset destination
    let (m, k, n) = (5, 7, 3);
    for act in ACTS {
        for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = rand(m * k, 1);
            let b = rand(k * n, 2);
            let g = gpu(act);
            let (ca, ga) = both(&g, act, &a);
            let (cb, gb) = both(&g, act, &b);
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
            let want = Cpu.matmul(ma(&ca), mb(&cb), 0.5, Dt::F32).unwrap();
            let got = g.matmul(ma(&ga), mb(&gb), 0.5, Dt::F32).unwrap();
            let (w, got) = (Cpu.to_f32(&want).unwrap(), g.to_f32(&got).unwrap());
            assert!(rel_err(&got, &w) < 1e-5, "{act:?} {at} {bt}");
            // accumulate into an f32 destination at an offset
            let base = rand(3 + m * n, 3);
            let mut cd = Cpu.upload_f32(&base, Dt::F32).unwrap();
            let mut gd = g.upload_f32(&base, Dt::F32).unwrap();
            Cpu.matmul_acc(&mut cd, 3, ma(&ca), mb(&cb), 2.0).unwrap();
            g.matmul_acc(&mut gd, 3, ma(&ga), mb(&gb), 2.0).unwrap();
            let (w, got) = (Cpu.to_f32(&cd).unwrap(), g.to_f32(&gd).unwrap());
            assert!(rel_err(&got, &w) < 1e-5, "acc {act:?} {at} {bt}");
            assert_eq!(&got[..3], &base[..3], "wrote before the offset");
        }
    }
}

#[test]
fn row_passes_match_the_cpu() {
    let (rows, width, inter) = (6, 48, 40);
    for act in ACTS {
        let x = rand(rows * width, 4);
        let w: Vec<f32> = rand(width, 5).iter().map(|v| v + 1.0).collect();
        let dy = rand(rows * width, 6);
        let g = gpu(act);
        let (cx, gx) = both(&g, act, &x);
        let (cw, gw) = both(&g, act, &w);
        let (cdy, gdy) = both(&g, act, &dy);
        let (cy, cr) = Cpu.rms_norm(&cx, &cw, 1e-5).unwrap();
        let (gy, gr) = g.rms_norm(&gx, &gw, 1e-5).unwrap();
        let e = rel_err(&g.to_f32(&gy).unwrap(), &Cpu.to_f32(&cy).unwrap());
        assert!(e < tol(act), "rms_norm {act:?}: {e}");
        assert!(rel_err(&g.to_f32(&gr).unwrap(), &Cpu.to_f32(&cr).unwrap()) < 1e-5);
        let dx0 = rounded(&dy, act);
        let mut cdx = Cpu.upload_f32(&dx0, Dt::F32).unwrap();
        let mut gdx = g.upload_f32(&dx0, act).unwrap();
        Cpu.rms_norm_bwd(&cx, &cw, &cr, &cdy, &mut cdx, true)
            .unwrap();
        g.rms_norm_bwd(&gx, &gw, &gr, &gdy, &mut gdx, true).unwrap();
        let e = rel_err(&g.to_f32(&gdx).unwrap(), &Cpu.to_f32(&cdx).unwrap());
        assert!(e < tol(act), "rms_norm_bwd {act:?}: {e}");
        // SwiGLU and its backward
        let gu = rand(rows * 2 * inter, 7);
        let d = rand(rows * inter, 8);
        let (cgu, ggu) = both(&g, act, &gu);
        let (cd, gd) = both(&g, act, &d);
        let e = rel_err(
            &g.to_f32(&g.swiglu(&ggu, inter).unwrap()).unwrap(),
            &Cpu.to_f32(&Cpu.swiglu(&cgu, inter).unwrap()).unwrap(),
        );
        assert!(e < tol(act), "swiglu {act:?}: {e}");
        let e = rel_err(
            &g.to_f32(&g.swiglu_bwd(&ggu, &gd, inter).unwrap()).unwrap(),
            &Cpu.to_f32(&Cpu.swiglu_bwd(&cgu, &cd, inter).unwrap())
                .unwrap(),
        );
        assert!(e < tol(act), "swiglu_bwd {act:?}: {e}");
        // dropout: the same mask on both devices
        let cdrop = Cpu.to_f32(&Cpu.dropout(&cx, 0.3, 99).unwrap()).unwrap();
        let gdrop = g.to_f32(&g.dropout(&gx, 0.3, 99).unwrap()).unwrap();
        for (a, b) in cdrop.iter().zip(&gdrop) {
            assert_eq!(*a == 0.0, *b == 0.0, "dropout mask {act:?}");
        }
        assert!(rel_err(&gdrop, &cdrop) < tol(act));
    }
}

/// Segments, positions and RoPE tables for the attention tests.
fn layout_for(
    be: &dyn Backend,
    lens: &[usize],
    heads: Heads,
    window: usize,
) -> crate::kernels::Layout {
    let mut segs = Vec::new();
    let mut pos = Vec::new();
    let mut start = 0;
    for &l in lens {
        segs.push((start, l));
        pos.extend((0..l as i32).map(|p| p + 3));
        start += l;
    }
    let half = heads.dim / 2;
    let inv: Vec<Vec<f32>> = vec![
        (0..half)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / heads.dim as f32))
            .collect(),
        (0..half)
            .map(|i| 0.5 / 10000f32.powf(2.0 * i as f32 / heads.dim as f32))
            .collect(),
    ];
    let tab: Vec<i32> = (0..pos.len()).map(|i| (i % 2) as i32).collect();
    be.layout(
        segs,
        vec![0; lens.len()],
        window,
        heads,
        RopeSpec {
            pos: &pos,
            tab: &tab,
            inv_freq: &inv,
            mscale: 1.1,
        },
    )
    .unwrap()
}

#[test]
fn rope_and_attention_forward_and_backward_match_the_cpu() {
    let lens = [1usize, 2, 17, 65, 40];
    let n: usize = lens.iter().sum();
    for act in ACTS {
        for (heads, window) in [
            (
                Heads {
                    q: 4,
                    kv: 2,
                    dim: 16,
                },
                usize::MAX,
            ),
            (
                Heads {
                    q: 2,
                    kv: 1,
                    dim: 32,
                },
                9,
            ),
            (
                Heads {
                    q: 2,
                    kv: 2,
                    dim: 96,
                },
                30,
            ),
        ] {
            let g = gpu(act);
            let (cl, gl) = (
                layout_for(&Cpu, &lens, heads, window),
                layout_for(&g, &lens, heads, window),
            );
            let qkv = rand(n * heads.qkv_width(), 10);
            let (mut cq, mut gq) = both(&g, act, &qkv);
            Cpu.rope(&mut cq, &cl, false).unwrap();
            g.rope(&mut gq, &gl, false).unwrap();
            let what = format!("{act:?} {heads:?} window {window}");
            let e = rel_err(&g.to_f32(&gq).unwrap(), &Cpu.to_f32(&cq).unwrap());
            assert!(e < tol(act), "rope {what}: {e}");
            // attention on the same (rounded) rotated inputs
            let roped = Cpu.to_f32(&cq).unwrap();
            let (cq, gq) = both(&g, act, &roped);
            let (co, _) = Cpu.attention(&cq, &cl, None, 0).unwrap();
            let (go, glse) = g.attention(&gq, &gl, None, 0).unwrap();
            let e = rel_err(&g.to_f32(&go).unwrap(), &Cpu.to_f32(&co).unwrap());
            assert!(e < 2.0 * tol(act), "attention {what}: {e}");
            let dout = rand(n * heads.q * heads.dim, 11);
            let (cdo, gdo) = both(&g, act, &dout);
            let cd = Cpu.attention_bwd(&cq, &co, None, &cdo, &cl).unwrap();
            let gd = g.attention_bwd(&gq, &go, glse.as_ref(), &gdo, &gl).unwrap();
            let (gd, cd) = (g.to_f32(&gd).unwrap(), Cpu.to_f32(&cd).unwrap());
            let e = rel_err(&gd, &cd);
            assert!(e < 4.0 * tol(act), "attention backward {what}: {e}");
            // the backward rotation (the transpose) undoes the forward one up to the
            // attention factor applied twice (mscale 1.1 in `layout_for`) on q and k
            let (_, mut back) = both(&g, act, &roped);
            g.rope(&mut back, &gl, true).unwrap();
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
            let e = rel_err(&g.to_f32(&back).unwrap(), &want);
            assert!(e < 2.0 * tol(act), "rope backward {what}: {e}");
        }
    }
}

#[test]
fn cross_entropy_sums_and_optimizer_match_the_cpu() {
    let (rows, hidden, vocab) = (9, 32, 301);
    for act in ACTS {
        let h = rand(rows * hidden, 20);
        let w = rand(vocab * hidden, 21);
        let t: Vec<i32> = (0..rows as i32)
            .map(|i| (i * 37 + 5) % vocab as i32)
            .collect();
        let g = gpu(act);
        let (ch, gh) = both(&g, act, &h);
        let (cw, gw) = both(&g, act, &w);
        let (ct, gt) = (Cpu.upload_i32(&t).unwrap(), g.upload_i32(&t).unwrap());
        let mut cl = Cpu.zeros(1, Dt::F64).unwrap();
        let mut gl = g.zeros(1, Dt::F64).unwrap();
        let cd = Cpu
            .cross_entropy(&ch, &cw, &ct, Some(0.25), &mut cl)
            .unwrap()
            .unwrap();
        let gd = g
            .cross_entropy(&gh, &gw, &gt, Some(0.25), &mut gl)
            .unwrap()
            .unwrap();
        let (a, b) = (g.to_f64(&gl).unwrap()[0], Cpu.to_f64(&cl).unwrap()[0]);
        assert!(
            (a - b).abs() < 10.0 * tol(act) as f64 * b.abs(),
            "ce loss {act:?}: {a} vs {b}"
        );
        let e = rel_err(&g.to_f32(&gd).unwrap(), &Cpu.to_f32(&cd).unwrap());
        assert!(e < 4.0 * tol(act), "ce dh {act:?}: {e}");
    }
    // the optimizer and its norm are f32 on every device
    let g = gpu(Dt::BF16);
    let n = 1000;
    let (p0, grads) = (rand(n, 30), rand(n, 31));
    let mut cp = Cpu.upload_f32(&p0, Dt::F32).unwrap();
    let mut gp = g.upload_f32(&p0, Dt::F32).unwrap();
    let (cg, gg) = (
        Cpu.upload_f32(&grads, Dt::F32).unwrap(),
        g.upload_f32(&grads, Dt::F32).unwrap(),
    );
    let (mut cm, mut cv) = (
        Cpu.zeros(n, Dt::F32).unwrap(),
        Cpu.zeros(n, Dt::F32).unwrap(),
    );
    let (mut gm, mut gv) = (g.zeros(n, Dt::F32).unwrap(), g.zeros(n, Dt::F32).unwrap());
    let (mut cs, mut gs) = (Cpu.zeros(2, Dt::F64).unwrap(), g.zeros(2, Dt::F64).unwrap());
    Cpu.sum_into(&cg, true, &mut cs, 1).unwrap();
    g.sum_into(&gg, true, &mut gs, 1).unwrap();
    let (a, b) = (g.to_f64(&gs).unwrap()[1], Cpu.to_f64(&cs).unwrap()[1]);
    assert!((a - b).abs() < 1e-9 * b, "{a} vs {b}");
    let step = crate::kernels::AdamWStep {
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
    let (mut cst, mut gst) = (Cpu.zeros(1, Dt::I32).unwrap(), g.zeros(1, Dt::I32).unwrap());
    Cpu.adamw(&mut cp, &cg, &mut cm, &mut cv, step, (&cs, 1), &mut cst)
        .unwrap();
    g.adamw(&mut gp, &gg, &mut gm, &mut gv, step, (&gs, 1), &mut gst)
        .unwrap();
    let e = rel_err(&g.to_f32(&gp).unwrap(), &Cpu.to_f32(&cp).unwrap());
    assert!(e < 1e-6, "adamw: {e}");
}

mod model {
    //! The whole model on the emulated GPU against the CPU.
    use super::*;
    use crate::model::phi3::tests::{packed_batch, tiny};

    fn train_step(be: Arc<dyn Backend>, dir: &std::path::Path, dropout: f64) -> (f64, Vec<f32>) {
        let m = tiny(dir, dropout, be.clone());
        let b = packed_batch(&m);
        let mut grads = be.zeros(m.n_lora(), Dt::F32).unwrap();
        let mut loss = be.zeros(1, Dt::F64).unwrap();
        let seed = (dropout > 0.0).then_some(7);
        m.forward_backward(&b, 0.5, false, seed, &mut grads, &mut loss)
            .unwrap();
        m.forward_backward(&b, 0.5, true, seed, &mut grads, &mut loss)
            .unwrap();
        (be.to_f64(&loss).unwrap()[0], be.to_f32(&grads).unwrap())
    }

    #[test]
    fn loss_and_adapter_gradients_match_the_cpu_in_f32_bf16_and_fp16() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        for dropout in [0.0, 0.25] {
            let (l_cpu, g_cpu) = train_step(Arc::new(Cpu), &dir, dropout);
            for (act, ltol, gtol) in [
                (Dt::F32, 1e-5, 1e-4),
                (Dt::BF16, 2e-2, 0.15),
                (Dt::F16, 5e-3, 0.05),
            ] {
                let (l, g) = train_step(Arc::new(gpu(act)), &dir, dropout);
                assert!(
                    (l - l_cpu).abs() < ltol * l_cpu.abs(),
                    "{act:?} dropout {dropout}: loss {l} vs {l_cpu}"
                );
                let e = rel_err(&g, &g_cpu);
                assert!(e < gtol, "{act:?} dropout {dropout}: gradients {e}");
            }
        }
    }

    #[test]
    fn greedy_generation_matches_the_cpu() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let next = |be: Arc<dyn Backend>| -> Vec<u32> {
            let m = tiny(&dir, 0.0, be);
            let mut caches: Vec<_> = (0..2).map(|_| m.new_cache(4).unwrap()).collect();
            let mut ids = [vec![5u32, 9, 11, 3, 7], vec![2u32, 8]];
            let mut out = vec![];
            let mut past = vec![0usize, 0];
            let mut step: Vec<u32> = ids.concat();
            let mut lens: Vec<usize> = ids.iter().map(Vec::len).collect();
            for _ in 0..6 {
                let b = m.batch_after(&step, &lens, &past).unwrap();
                let mut refs: Vec<_> = caches.iter_mut().collect();
                let logits = m.forward_cached(&b, &mut refs).unwrap();
                step.clear();
                for (i, row) in logits.iter().enumerate() {
                    let t = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0 as u32;
                    out.push(t);
                    past[i] += lens[i];
                    ids[i].push(t);
                    step.push(t);
                }
                lens = vec![1, 1];
            }
            out
        };
        let want = next(Arc::new(Cpu));
        assert_eq!(next(Arc::new(gpu(Dt::F32))), want);
        // the caches grew past their capacity of 4: the growth path ran too
    }
}
