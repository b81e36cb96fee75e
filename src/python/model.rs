//! `LoraModel` (Phi-3 + LoRA: logits, loss and gradients, adapter I/O, export) and
//! `finetune` (the whole training job).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use crate::kernels::Dt;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_pyerr;
use super::run::{run_blocking, run_blocking_with_grace};
use crate::error::{Error, Result};
use crate::hub::HubClient;
use crate::model::{self, LoraConfig, Phi3};
use crate::train::{self, TrainConfig};

/// Phi-3 with LoRA adapters, for inspection, tests and export.
#[pyclass(name = "LoraModel", module = "ferrotune._core", frozen)]
pub struct PyLoraModel {
    inner: Arc<Phi3>,
}

/// Any integer sequence or array as i64s (numpy does the conversion).
fn int_vec(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    let py = obj.py();
    let np = py.import("numpy")?;
    let arr = np.call_method1("ascontiguousarray", (obj, "int64"))?;
    let arr = arr.downcast::<PyArray1<i64>>().map_err(|_| {
        to_pyerr(
            py,
            Error::InvalidArgument(format!("{what} must be a 1-D sequence of integers")),
        )
    })?;
    Ok(arr.readonly().as_slice()?.to_vec())
}

fn ids_vec(ids: &[i64]) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&t| {
            u32::try_from(t).map_err(|_| {
                Error::InvalidArgument(format!("token id {t} is negative or too large"))
            })
        })
        .collect()
}

fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dims = t.dims().to_vec();
    let v = (|| -> candle_core::Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    })()
    .map_err(|e| to_pyerr(py, e.into()))?;
    PyArray1::from_vec(py, v).reshape(dims)
}

impl PyLoraModel {
    fn lengths(&self, n: usize, seq_lengths: Option<Vec<usize>>) -> Vec<usize> {
        seq_lengths.unwrap_or_else(|| if n == 0 { vec![] } else { vec![n] })
    }
}

#[pymethods]
impl PyLoraModel {
    /// Loads a model folder, an Azure ML MLflow folder or a Hub repo, and adds adapters
    /// (fresh from `seed`, or those of the PEFT folder `adapter`). `precision` as in
    /// `finetune` (`model::backend`): "auto" is float32 on the CPU and bf16 (fp16 before
    /// sm_80) on a GPU; "32" keeps a GPU in float32.
    #[staticmethod]
    #[pyo3(signature = (model, *, lora_r=8, lora_alpha=128.0, lora_dropout=0.0, target_modules=None, use_rslora=false, seed=42, device="cpu".to_string(), precision="auto".to_string(), adapter=None, token=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        model: String,
        lora_r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        target_modules: Option<Vec<String>>,
        use_rslora: bool,
        seed: u64,
        device: String,
        precision: String,
        adapter: Option<PathBuf>,
        token: Option<String>,
        progress: Option<PyObject>,
    ) -> PyResult<Self> {
        let inner = run_blocking(py, progress, move |ctx| {
            let mut lora = LoraConfig {
                r: lora_r,
                alpha: lora_alpha,
                dropout: lora_dropout,
                target_modules: target_modules
                    .unwrap_or_else(|| model::TARGETS.iter().map(|s| s.to_string()).collect()),
                use_rslora,
            };
            if let Some(a) = &adapter {
                lora = model::export::read_adapter_config(a)?;
            }
            let be = model::backend(&device, &precision)?;
            let folder =
                model::weights::resolve_model(&model, "main", || HubClient::from_env(token), ctx)?;
            let m = Phi3::load(&folder, lora, seed, be)?;
            if let Some(a) = &adapter {
                m.load_adapter(a)?;
            }
            Ok(Arc::new(m))
        })?;
        Ok(Self { inner })
    }

    /// The parsed config.json (as a dict).
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<PyObject> {
        let json = py.import("json")?;
        Ok(json
            .call_method1("loads", (self.inner.cfg.raw.to_string(),))?
            .unbind())
    }

    /// PEFT names of the adapter tensors, in a fixed order.
    fn lora_names(&self) -> Vec<String> {
        self.inner.lora_names()
    }

    /// The adapter tensors by PEFT name (float32 numpy arrays; A is (r, in), B (out, r)).
    fn get_lora<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let state = self.inner.lora_state().map_err(|e| to_pyerr(py, e))?;
        for (name, t) in state {
            d.set_item(name, to_numpy(py, &t)?)?;
        }
        Ok(d)
    }

    /// Sets every adapter tensor from a dict of PEFT name → array.
    fn set_lora(&self, py: Python<'_>, state: HashMap<String, Bound<'_, PyAny>>) -> PyResult<()> {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        let np = py.import("numpy")?;
        for (name, obj) in state {
            let arr = np.call_method1("ascontiguousarray", (obj, "float32"))?;
            let arr = arr.downcast::<PyArrayDyn<f32>>().map_err(|_| {
                to_pyerr(
                    py,
                    Error::InvalidArgument(format!("adapter tensor '{name}' is not a float array")),
                )
            })?;
            let arr: PyReadonlyArrayDyn<'_, f32> = arr.readonly();
            let shape = arr.shape().to_vec();
            let v: Vec<f32> = arr.as_array().iter().copied().collect();
            let t = Tensor::from_vec(v, shape, &dev).map_err(|e| to_pyerr(py, e.into()))?;
            tensors.insert(name, t);
        }
        self.inner
            .set_lora_state(&tensors, true)
            .map_err(|e| to_pyerr(py, e))
    }

    /// Logits (tokens, vocab) float32 for flat `input_ids`, split into conversations by
    /// `seq_lengths` (positions restart and attention stays inside each).
    #[pyo3(signature = (input_ids, seq_lengths=None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        seq_lengths: Option<Vec<usize>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let ids = ids_vec(&int_vec(input_ids, "input_ids")?).map_err(|e| to_pyerr(py, e))?;
        let lens = self.lengths(ids.len(), seq_lengths);
        let m = self.inner.clone();
        let vocab = m.cfg.vocab_size;
        let (n, v) = run_blocking(py, None, move |_| {
            let b = m.batch(&ids, None, &lens)?;
            Ok((b.n_tokens(), m.logits(&b)?))
        })?;
        PyArray1::from_vec(py, v).reshape(vec![n, vocab])
    }

    /// `(mean loss, number of targets, {name: d(mean loss)/d(adapter tensor)})`.
    #[pyo3(signature = (input_ids, labels, seq_lengths=None, recompute=false))]
    fn loss_and_grads<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
        seq_lengths: Option<Vec<usize>>,
        recompute: bool,
    ) -> PyResult<(f64, usize, Bound<'py, PyDict>)> {
        let ids = ids_vec(&int_vec(input_ids, "input_ids")?).map_err(|e| to_pyerr(py, e))?;
        let labels: Vec<i32> = int_vec(labels, "labels")?
            .iter()
            .map(|&l| l.clamp(i32::MIN as i64, i32::MAX as i64) as i32)
            .collect();
        let lens = self.lengths(ids.len(), seq_lengths);
        let m = self.inner.clone();
        let (loss, n, grads) = run_blocking(py, None, move |_| {
            let b = m.batch(&ids, Some(&labels), &lens)?;
            let n = b.n_targets();
            if n == 0 {
                return Err(Error::InvalidArgument(
                    "no position has a label other than -100".into(),
                ));
            }
            let be = m.backend();
            let mut grads = be.zeros(m.n_lora(), Dt::F32)?;
            let mut loss = be.zeros(1, Dt::F64)?;
            m.forward_backward(&b, 1.0 / n as f64, recompute, None, &mut grads, &mut loss)?;
            let sum = be.to_f64(&loss)?[0];
            Ok((sum / n as f64, n, be.to_f32(&grads)?))
        })?;
        let d = PyDict::new(py);
        for (name, shape, off) in self.inner.lora_layout() {
            let k: usize = shape.iter().product();
            let g = PyArray1::from_vec(py, grads[off..off + k].to_vec()).reshape(shape)?;
            d.set_item(name, g)?;
        }
        Ok((loss, n, d))
    }

    /// Writes a PEFT adapter folder.
    #[pyo3(signature = (path, base_model=None))]
    fn save_adapter(
        &self,
        py: Python<'_>,
        path: PathBuf,
        base_model: Option<String>,
    ) -> PyResult<String> {
        let m = self.inner.clone();
        let base = base_model.unwrap_or_else(|| m.folder.display().to_string());
        run_blocking(py, None, move |_| {
            Ok(m.save_adapter(&path, &base)?.display().to_string())
        })
    }

    /// Writes the merged model as a Hugging Face folder.
    #[pyo3(signature = (path, progress=None))]
    fn save_merged(
        &self,
        py: Python<'_>,
        path: PathBuf,
        progress: Option<PyObject>,
    ) -> PyResult<String> {
        let m = self.inner.clone();
        run_blocking(py, progress, move |ctx| {
            Ok(m.save_merged(&path, ctx)?.display().to_string())
        })
    }
}

/// Runs a fine-tuning job from a JSON configuration; returns the summary as JSON.
#[pyfunction]
#[pyo3(signature = (config_json, progress=None))]
pub fn finetune(
    py: Python<'_>,
    config_json: String,
    progress: Option<PyObject>,
) -> PyResult<String> {
    let cfg = TrainConfig::from_json(&config_json).map_err(|e| to_pyerr(py, e))?;
    // Ctrl-C saves a checkpoint first: give the worker time to finish writing it.
    run_blocking_with_grace(py, progress, Duration::from_secs(300), move |ctx| {
        let s = train::finetune(&cfg, ctx)?;
        Ok(serde_json::to_string(&s).expect("summary serialises"))
    })
}

/// Writes a random-weight Phi-3 folder (Phi-3-mini's config with `config` overrides applied,
/// weights ~ N(0, initializer_range) from `seed`, the tokenizer files of `tokenizer`).
#[pyfunction]
#[pyo3(signature = (out_dir, config=None, seed=0, tokenizer=None))]
pub fn create_random_model(
    py: Python<'_>,
    out_dir: PathBuf,
    config: Option<Bound<'_, PyDict>>,
    seed: u64,
    tokenizer: Option<PathBuf>,
) -> PyResult<String> {
    let json = match config {
        Some(d) => py
            .import("json")?
            .call_method1("dumps", (d,))?
            .extract::<String>()?,
        None => "{}".to_string(),
    };
    let overrides: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| to_pyerr(py, Error::InvalidArgument(format!("config: {e}"))))?;
    run_blocking(py, None, move |_| {
        Ok(
            model::random::create_random_model(&out_dir, &overrides, seed, tokenizer.as_deref())?
                .display()
                .to_string(),
        )
    })
}
