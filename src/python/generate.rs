//! `Generator`: chat generation with a merged model or a base model + PEFT adapter.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::chat::messages_from_py;
use super::errors::to_pyerr;
use super::run::run_blocking;
use crate::chat::Message;
use crate::error::Error;
use crate::generate::{GenerateParams, Generator};
use crate::model;

/// A Phi-3 model and its tokenizer, loaded for generation.
#[pyclass(name = "Generator", module = "ferrotune._core", frozen)]
pub struct PyGenerator {
    inner: Arc<Generator>,
    device: String,
}

fn conversations_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<Message>>> {
    let py = obj.py();
    let bad = |m: String| to_pyerr(py, Error::InvalidArgument(m));
    let mut out = vec![];
    for (i, conv) in obj.try_iter()?.enumerate() {
        let conv = conv?;
        if conv.is_instance_of::<pyo3::types::PyString>() || conv.is_instance_of::<PyDict>() {
            return Err(bad(format!(
                "conversation {i} is not a list of messages ({{'role': ..., 'content': ...}} dicts)"
            )));
        }
        let (messages, non_string) = messages_from_py(&conv)?;
        if non_string {
            return Err(bad(format!(
                "conversation {i}: every message needs a string 'content' (and a 'role')"
            )));
        }
        out.push(messages);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn params(
    max_new_tokens: usize,
    do_sample: bool,
    temperature: f64,
    top_p: f64,
    top_k: usize,
    repetition_penalty: f64,
    seed: Option<u64>,
) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        do_sample,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        seed,
    }
}

#[pymethods]
impl PyGenerator {
    /// Loads a merged model (a folder, an Azure ML MLflow folder or a Hub repo id), or a
    /// base model with the PEFT adapter folder `adapter` on top.
    #[staticmethod]
    #[pyo3(signature = (model, *, adapter=None, device="auto".to_string(), precision="auto".to_string(), token=None, progress=None))]
    fn load(
        py: Python<'_>,
        model: PathBuf,
        adapter: Option<PathBuf>,
        device: String,
        precision: String,
        token: Option<String>,
        progress: Option<PyObject>,
    ) -> PyResult<Self> {
        let source = model.to_string_lossy().into_owned();
        let (inner, dev_name) = run_blocking(py, progress, move |ctx| {
            let be = model::backend(&device, &precision)?;
            let name = be.name();
            let g = Generator::load(&source, adapter.as_deref(), be, token, ctx)?;
            Ok((Arc::new(g), name))
        })?;
        Ok(Self {
            inner,
            device: dev_name,
        })
    }

    /// The ids that end a reply (generation_config.json's `eos_token_id`).
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids().to_vec()
    }

    /// The longest prompt + reply, in tokens (`max_position_embeddings`).
    #[getter]
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }

    /// "cpu" or "cuda:N".
    #[getter]
    fn device(&self) -> String {
        self.device.clone()
    }

    /// The model folder the weights came from.
    #[getter]
    fn model_dir(&self) -> String {
        self.inner.model().folder.display().to_string()
    }

    /// The prompt ids of one conversation (the chat template with the generation prompt, or
    /// the final assistant message left open to be continued).
    fn prompt_ids(&self, py: Python<'_>, messages: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        let conv = conversations_from_py(PyList::new(py, [messages])?.as_any())?;
        self.inner.prompt(&conv[0]).map_err(|e| to_pyerr(py, e))
    }

    /// Replies to each conversation: a list of dicts with `text`, `token_ids`,
    /// `finish_reason` ("stop" or "length") and `prompt_tokens`. With `stream`, text pieces
    /// reach `progress` as `("text", conversation_index, piece, None, 0, "")` events.
    #[pyo3(signature = (conversations, *, max_new_tokens=256, do_sample=false, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, seed=None, stream=false, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        conversations: &Bound<'py, PyAny>,
        max_new_tokens: usize,
        do_sample: bool,
        temperature: f64,
        top_p: f64,
        top_k: usize,
        repetition_penalty: f64,
        seed: Option<u64>,
        stream: bool,
        progress: Option<PyObject>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let convs = conversations_from_py(conversations)?;
        let p = params(
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
        );
        let g = self.inner.clone();
        let out = run_blocking(py, progress, move |ctx| g.generate(&convs, &p, stream, ctx))?;
        out.into_iter()
            .map(|c| {
                let d = PyDict::new(py);
                d.set_item("text", c.text)?;
                d.set_item("token_ids", c.token_ids)?;
                d.set_item("finish_reason", c.finish_reason.as_str())?;
                d.set_item("prompt_tokens", c.prompt_tokens)?;
                Ok(d)
            })
            .collect()
    }

    /// The same loop on token ids: for each prompt, `(new ids without the final EOS,
    /// finish_reason)`.
    #[pyo3(signature = (prompts, *, max_new_tokens=256, do_sample=false, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, seed=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_ids(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        max_new_tokens: usize,
        do_sample: bool,
        temperature: f64,
        top_p: f64,
        top_k: usize,
        repetition_penalty: f64,
        seed: Option<u64>,
        progress: Option<PyObject>,
    ) -> PyResult<Vec<(Vec<u32>, &'static str)>> {
        let p = params(
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
        );
        let g = self.inner.clone();
        let out = run_blocking(py, progress, move |ctx| {
            g.generate_ids(&prompts, &p, ctx, &mut |_, _| Ok(()))
        })?;
        Ok(out.into_iter().map(|(ids, r)| (ids, r.as_str())).collect())
    }

    fn __repr__(&self) -> String {
        format!(
            "Generator(model_dir={:?}, device={:?})",
            self.inner.model().folder.display().to_string(),
            self.device
        )
    }
}
