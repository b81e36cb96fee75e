//! The GPU backend on the emulated GPU against the CPU backend: every primitive
//! (`selfcheck`, the same checks a real GPU runs in `pytest -m gpu`) in f32, bf16 and fp16,
//! the parameter layouts, then the whole model. The kernels run from the same CUDA sources
//! a GPU runs.

use std::sync::Arc;

use super::emu::Emu;
use super::selfcheck::{self, rel_err, Sizes};
use super::Gpu;
use crate::kernels::cpu::Cpu;
use crate::kernels::{Backend, Dt};

fn gpu(act: Dt) -> Gpu {
    Gpu::new(Arc::new(Emu::new((8, 0))), act, "emu".into())
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
        ("gather_rows_f32", size_of::<p::Rows>()),
        ("scatter_rows_bf16", size_of::<p::Rows>()),
        ("ce_rows_bf16", size_of::<p::CeRows>()),
        ("sum_f32", size_of::<p::Sum>()),
        ("sum_f32_finish", size_of::<p::Sum>()),
        ("adamw_f32", size_of::<p::AdamW>()),
        ("attn_fwd_bf16", size_of::<p::AttnFwd>()),
        ("attn_fwd_simt_f16", size_of::<p::AttnFwd>()),
        ("kv_append_bf16", size_of::<p::AttnFwd>()),
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
fn every_primitive_matches_the_cpu_in_f32_bf16_and_fp16() {
    for act in [Dt::F32, Dt::BF16, Dt::F16] {
        let checks = selfcheck::run(&gpu(act), Sizes { full: false }, None);
        assert!(checks.len() >= 30, "{} checks", checks.len());
        let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
        assert!(failed.is_empty(), "{act:?}: {failed:#?}");
    }
}

#[test]
fn the_simt_attention_kernels_match_too() {
    // FERROTUNE_ATTENTION=simt's kernels (and f32's) on the 16-bit types
    for act in [Dt::BF16, Dt::F16] {
        let g = gpu(act).with_simt_attention();
        let checks = selfcheck::run(&g, Sizes { full: false }, Some("attention"));
        let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
        assert!(
            !checks.is_empty() && failed.is_empty(),
            "{act:?}: {failed:#?}"
        );
    }
}

#[test]
fn a_device_error_is_reported_as_a_failed_check_not_a_crash() {
    // a GPU that runs out of memory at once
    let g = Gpu::new(
        Arc::new(Emu::with_memory((8, 0), 1000)),
        Dt::BF16,
        "emu".into(),
    );
    let checks = selfcheck::run(&g, Sizes { full: false }, Some("rms_norm"));
    assert_eq!(checks.len(), 1);
    assert!(!checks[0].passed);
    assert!(checks[0]
        .failure
        .as_deref()
        .unwrap()
        .contains("out of GPU memory"));
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

#[test]
fn the_profiler_times_every_launch_and_gemm_while_on() {
    use super::profile;
    use crate::kernels::Mat;
    // (other tests may run on emulated GPUs meanwhile: what they add is only more rows)
    let g = gpu(Dt::BF16);
    let a = g.upload_f32(&[0.5; 6 * 4], Dt::BF16).unwrap();
    let b = g.upload_f32(&[0.25; 4 * 3], Dt::BF16).unwrap();
    let w = g.upload_f32(&[1.0; 4], Dt::BF16).unwrap();
    let run = |n: usize| {
        for _ in 0..n {
            g.matmul(Mat::of(&a, 6, 4), Mat::of(&b, 4, 3), 1.0, Dt::F32)
                .unwrap();
            g.rms_norm(&a, &w, 1e-5).unwrap();
        }
        g.to_f32(&w).unwrap();
    };
    run(1); // not profiled
    profile::start();
    run(3);
    let p = profile::stop().unwrap();
    let row = |pred: &dyn Fn(&str) -> bool| {
        p.entries
            .iter()
            .find(|e| pred(&e.name))
            .unwrap_or_else(|| panic!("no such row in {:#?}", p.entries))
    };
    let gemm = row(&|n| n.starts_with("gemm ") && n.contains("3x6x4 bf16→f32"));
    assert!(gemm.calls >= 3 && gemm.calls % 3 == 0, "{gemm:?}");
    assert_eq!(gemm.flops, gemm.calls as f64 * 2.0 * 6.0 * 3.0 * 4.0);
    let norm = row(&|n| n == "rms_norm_fwd_bf16");
    assert!(norm.calls >= 3 && norm.flops == 0.0, "{norm:?}");
    assert!(norm.seconds > 0.0 && gemm.seconds > 0.0);
    assert!(p.device.contains("emulated"), "{}", p.device);
    assert!(p.calls >= 6);
    let busy: f64 = p.entries.iter().map(|e| e.seconds).sum();
    assert!((busy - p.busy_seconds).abs() < 1e-12);
    // (busy <= span holds for one device, tests/test_gpu_profile.py; here other tests'
    // emulated GPUs add their calls to the busy time)
    assert!(p.device_span_seconds <= p.host_seconds + 1e-9, "{p:?}");
    assert!(
        p.entries.windows(2).all(|w| w[0].seconds >= w[1].seconds),
        "rows longest first"
    );
    // off again: nothing is timed, and stopping twice is an error
    let err = profile::stop().unwrap_err().to_string();
    assert!(err.contains("not running"), "{err}");
    run(1);
}

#[test]
fn attention_strides_over_heads_and_segments_beyond_its_grid() {
    // CUDA caps a grid's y and z at 65,535 and the attention launches cap heads and segments
    // there (a micro-batch of >65,535 one-token conversations); the kernels then stride. The
    // same cap lowered to 3 must give bit-identical results, forward and backward, on both
    // kernel families.
    use crate::kernels::Heads;
    for (act, simt) in [(Dt::BF16, false), (Dt::F16, true)] {
        let full = if simt {
            gpu(act).with_simt_attention()
        } else {
            gpu(act)
        };
        let capped = if simt {
            gpu(act).with_simt_attention()
        } else {
            gpu(act)
        }
        .with_attn_grid_yz(3);
        let lens = [1, 5, 70, 1, 1, 33, 2, 1, 9, 1];
        let heads = Heads {
            q: 8,
            kv: 2,
            dim: 32,
        };
        let n: usize = lens.iter().sum();
        let val = |i: usize| ((i * 7919) % 251) as f32 / 128.0 - 1.0;
        let qkv_h: Vec<f32> = (0..n * heads.qkv_width()).map(val).collect();
        let dout_h: Vec<f32> = (0..n * heads.q * heads.dim).map(|i| val(i + 17)).collect();
        let run = |g: &Gpu| {
            let lay = selfcheck::layout_for(g, &lens, heads, 48).unwrap();
            let qkv = g.upload_f32(&qkv_h, act).unwrap();
            let (out, lse) = g.attention(&qkv, &lay, None, 0).unwrap();
            let dout = g.upload_f32(&dout_h, act).unwrap();
            let dqkv = g
                .attention_bwd(&qkv, &out, lse.as_ref(), &dout, &lay)
                .unwrap();
            (g.to_f32(&out).unwrap(), g.to_f32(&dqkv).unwrap())
        };
        let (a, b) = (run(&full), run(&capped));
        assert!(a.0.iter().any(|x| *x != 0.0) && a.1.iter().all(|x| x.is_finite()));
        assert_eq!(a.0, b.0, "{act:?} forward");
        assert_eq!(a.1, b.1, "{act:?} backward");
    }
}
