//! `x @ wᵀ` through candle's CPU matmul (the `gemm` crate) for the benchmark model's layer
//! shapes: one JSON line per shape. Driven by `bench/bench_gemm.py`, which runs torch on the
//! same shapes in the same run. Threads: `RAYON_NUM_THREADS`.

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: gemm_probe REPS M K N [M K N ...]"))
        .collect();
    let (reps, shapes) = args
        .split_first()
        .expect("usage: gemm_probe REPS M K N ...");
    let d = Device::Cpu;
    for s in shapes.chunks_exact(3) {
        let (m, k, n) = (s[0], s[1], s[2]);
        let x = Tensor::randn(0f32, 1.0, (m, k), &d)?;
        let wt = Tensor::randn(0f32, 1.0, (n, k), &d)?.t()?;
        for _ in 0..3 {
            x.matmul(&wt)?;
        }
        let t0 = Instant::now();
        for _ in 0..*reps {
            x.matmul(&wt)?;
        }
        let secs = t0.elapsed().as_secs_f64() / *reps as f64;
        println!("{{\"m\": {m}, \"k\": {k}, \"n\": {n}, \"seconds\": {secs}}}");
    }
    Ok(())
}
