//! The Python bindings: the only module that uses pyo3. Every long call goes through
//! [`run::run_blocking`] (GIL released, errors mapped, Ctrl-C honoured, progress forwarded).

mod chat;
mod errors;
mod generate;
mod model;
mod run;

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::data::{self, DownloadOptions, OutputFormat, SplitPc};
use crate::hub::{HubClient, Repo, RepoKind};

/// Downloads the first `split_pc` % of every split of a Hub dataset into `download_dir`
/// as `{split}.jsonl` (byte-identical to download-dataset.py) and/or `{split}.parquet`.
///
/// Returns a list of dicts: `split`, `rows`, `total_rows`, `paths`, `bytes_fetched`.
#[pyfunction]
#[pyo3(signature = (dataset, download_dir, split_pc, subset=None, splits=None, revision="main".to_string(), formats=vec!["jsonl".to_string()], token=None, full_download=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn download_dataset(
    py: Python<'_>,
    dataset: String,
    download_dir: PathBuf,
    split_pc: String,
    subset: Option<String>,
    splits: Option<Vec<String>>,
    revision: String,
    formats: Vec<String>,
    token: Option<String>,
    full_download: bool,
    progress: Option<PyObject>,
) -> PyResult<Vec<PyObject>> {
    let outputs = run::run_blocking(py, progress, move |ctx| {
        let opts = DownloadOptions {
            dataset,
            download_dir,
            split_pc: SplitPc::parse(&split_pc)?,
            subset,
            splits,
            revision,
            formats: formats
                .iter()
                .map(|f| OutputFormat::parse(f))
                .collect::<crate::error::Result<_>>()?,
            full_download,
        };
        let hub = HubClient::from_env(token);
        data::download_dataset(&hub, &opts, ctx)
    })?;
    outputs
        .into_iter()
        .map(|o| {
            let d = PyDict::new(py);
            d.set_item("split", o.split)?;
            d.set_item("rows", o.rows)?;
            d.set_item("total_rows", o.total_rows)?;
            d.set_item(
                "paths",
                o.paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>(),
            )?;
            d.set_item("bytes_fetched", o.bytes_fetched)?;
            Ok(d.into_any().unbind())
        })
        .collect()
}

/// The split names of a Hub dataset, as `datasets.get_dataset_split_names` reports them.
#[pyfunction]
#[pyo3(signature = (dataset, subset=None, revision="main".to_string(), token=None, progress=None))]
fn split_names(
    py: Python<'_>,
    dataset: String,
    subset: Option<String>,
    revision: String,
    token: Option<String>,
    progress: Option<PyObject>,
) -> PyResult<Vec<String>> {
    run::run_blocking(py, progress, move |ctx| {
        let hub = HubClient::from_env(token);
        let repo = Repo::dataset(&dataset)?;
        let commit = hub.resolve_revision(&repo, &revision, ctx)?;
        let splits =
            data::download_dataset::dataset_splits(&hub, &repo, &commit, subset.as_deref(), ctx)?;
        Ok(splits.into_iter().map(|s| s.name).collect())
    })
}

/// Downloads one file of a Hub repo into the shared Hugging Face cache (like
/// `huggingface_hub.hf_hub_download`) and returns its local path.
#[pyfunction]
#[pyo3(signature = (repo_id, filename, repo_type="model".to_string(), revision="main".to_string(), token=None, progress=None))]
fn hub_download(
    py: Python<'_>,
    repo_id: String,
    filename: String,
    repo_type: String,
    revision: String,
    token: Option<String>,
    progress: Option<PyObject>,
) -> PyResult<String> {
    run::run_blocking(py, progress, move |ctx| {
        let hub = HubClient::from_env(token);
        let repo = Repo::new(&repo_id, RepoKind::parse(&repo_type)?)?;
        Ok(hub
            .download(&repo, &revision, &filename, ctx)?
            .display()
            .to_string())
    })
}

/// `s` as a JSON string literal in pandas' `to_json` escaping (for tests and tools).
#[pyfunction]
fn _json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    data::jsonl::write_str(s, &mut out);
    String::from_utf8(out).expect("the writer emits ASCII")
}

/// Writes every row of a local Parquet file as pandas-style JSON Lines (for tests).
#[pyfunction]
fn _parquet_to_jsonl(py: Python<'_>, src: PathBuf, dst: PathBuf) -> PyResult<u64> {
    run::run_blocking(py, None, move |ctx| {
        let name = src.display().to_string();
        let shard = data::parquet_source::Shard::local(&name, src)?;
        let hub = HubClient::from_env(None);
        let mut out = Vec::new();
        let mut rows = 0u64;
        for rg in 0..shard.metadata.num_row_groups() {
            shard.for_each_batch(&hub, rg, usize::MAX, ctx, &mut |b| {
                rows += b.num_rows() as u64;
                data::jsonl::write_batch(&b, &mut out)
            })?;
        }
        std::fs::write(&dst, out).map_err(|e| crate::error::Error::io(&dst, e))?;
        Ok(rows)
    })
}

/// `round(pc * n / 100)` as `datasets` computes it for `split[0%:pc%]`.
#[pyfunction]
fn rows_for_split_pc(split_pc: String, n: u64) -> PyResult<u64> {
    SplitPc::parse(&split_pc)
        .map(|pc| pc.rows_of(n))
        .map_err(|e| Python::with_gil(|py| errors::to_pyerr(py, e)))
}

/// Every GPU primitive against its CPU twin on `device` ("cuda", "cuda:N", or "emu" in test
/// builds) at `precision`: a JSON list of checks (name, dtype, shapes, error, tolerance,
/// passed, failure). `full` adds Phi-3's sizes; `only` keeps the checks whose name contains
/// it. For `pytest -m gpu` and `scripts/gpu_check.sh`.
#[pyfunction]
#[pyo3(signature = (device, precision="auto".to_string(), full=false, only=None))]
fn _gpu_selfcheck(
    py: Python<'_>,
    device: String,
    precision: String,
    full: bool,
    only: Option<String>,
) -> PyResult<String> {
    let run = move || -> crate::error::Result<String> {
        let be = crate::model::backend(&device, &precision)?;
        if be.name() == "cpu" {
            return Err(crate::error::Error::GpuUnavailable(format!(
                "device {device:?} is the CPU: the self-check compares a GPU with the CPU"
            )));
        }
        let checks = crate::kernels::cuda::selfcheck::run(
            be.as_ref(),
            crate::kernels::cuda::selfcheck::Sizes { full },
            only.as_deref(),
        );
        Ok(serde_json::to_string(&checks).expect("checks serialise"))
    };
    py.allow_threads(run).map_err(|e| errors::to_pyerr(py, e))
}

/// The GPU profiler (`kernels/cuda/profile.rs`): `"start"` times every later launch, GEMM
/// and copy of the process's GPU backends; `"stop"` waits for them and returns the profile
/// as JSON (device, host_seconds, device_span_seconds, busy_seconds, calls, entries: name,
/// calls, seconds, flops; longest first). For `bench/gpu_train.py` and the GPU check.
#[pyfunction]
fn _gpu_profile(py: Python<'_>, action: &str) -> PyResult<Option<String>> {
    use crate::kernels::cuda::profile;
    match action {
        "start" => {
            profile::start();
            Ok(None)
        }
        "stop" => py
            .allow_threads(profile::stop)
            .map(|p| Some(serde_json::to_string(&p).expect("profile serialises")))
            .map_err(|e| errors::to_pyerr(py, e)),
        other => Err(errors::to_pyerr(
            py,
            crate::error::Error::InvalidArgument(format!(
                "_gpu_profile: action {other:?}: use \"start\" or \"stop\""
            )),
        )),
    }
}

/// Allocations made so far by the emulated GPUs of this process (test builds), or -1.
#[pyfunction]
fn _emu_allocations() -> i64 {
    #[cfg(feature = "gpu-emu")]
    return crate::kernels::cuda::emu::allocations() as i64;
    #[cfg(not(feature = "gpu-emu"))]
    -1
}

/// Whether this build has CUDA support (the CUDA wheel), whether or not a GPU is here.
#[pyfunction]
fn cuda_build() -> bool {
    cfg!(feature = "cuda")
}

/// Whether this build has the emulated GPU of the test builds (`device="emu"`).
#[pyfunction]
fn gpu_emulator() -> bool {
    cfg!(feature = "gpu-emu")
}

/// Whether this build of ferrotune can use a CUDA GPU here (built with CUDA, and a GPU opens).
#[pyfunction]
fn cuda_available() -> bool {
    crate::model::backend("auto", "auto").is_ok_and(|b| b.name() != "cpu")
}

/// Seconds taken by each of `repeats` sums of a `floats`-long float32 tensor over the
/// data-parallel group `world` (a JSON `WorldSpec`): the gradient exchange of a training
/// step, on its own (for `bench/bench_grad_exchange.py`).
#[pyfunction]
fn _group_sum_timings(
    py: Python<'_>,
    world: &str,
    floats: usize,
    repeats: usize,
) -> PyResult<Vec<f64>> {
    let spec: crate::train::WorldSpec = serde_json::from_str(world).map_err(|e| {
        errors::to_pyerr(
            py,
            crate::error::Error::InvalidArgument(format!("world: {e}")),
        )
    })?;
    let timings = py.allow_threads(move || -> crate::error::Result<Vec<f64>> {
        let be = crate::kernels::cpu::Cpu;
        let mut group = crate::train::distributed::Group::join(
            &spec,
            "bench",
            &be,
            &crate::progress::Ctx::silent(),
        )?;
        let mut out = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let mut t = vec![1f32; floats];
            let t0 = std::time::Instant::now();
            group.sum_f32(&mut t)?;
            out.push(t0.elapsed().as_secs_f64());
        }
        group.barrier()?;
        Ok(out)
    });
    timings.map_err(|e| errors::to_pyerr(py, e))
}

#[pymodule]
#[pyo3(name = "_core")]
fn ferrotune_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(download_dataset, m)?)?;
    m.add_function(wrap_pyfunction!(split_names, m)?)?;
    m.add_function(wrap_pyfunction!(hub_download, m)?)?;
    m.add_function(wrap_pyfunction!(rows_for_split_pc, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_emulator, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_build, m)?)?;
    m.add_function(wrap_pyfunction!(_emu_allocations, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_selfcheck, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_profile, m)?)?;
    m.add_function(wrap_pyfunction!(_json_string, m)?)?;
    m.add_function(wrap_pyfunction!(_group_sum_timings, m)?)?;
    m.add_class::<chat::PyChatTokenizer>()?;
    m.add_function(wrap_pyfunction!(chat::tokenize_dataset, m)?)?;
    m.add_function(wrap_pyfunction!(chat::load_tokenized, m)?)?;
    m.add_function(wrap_pyfunction!(_parquet_to_jsonl, m)?)?;
    m.add_class::<model::PyLoraModel>()?;
    m.add_function(wrap_pyfunction!(model::finetune, m)?)?;
    m.add_class::<generate::PyGenerator>()?;
    m.add_function(wrap_pyfunction!(model::create_random_model, m)?)?;
    Ok(())
}
