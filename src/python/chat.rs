//! Bindings of the chat module: `ChatTokenizer`, `tokenize_dataset`, `load_tokenized`.
//! Token arrays cross into Python as numpy arrays that take over the Rust buffers
//! (no copy).

use std::path::PathBuf;
use std::sync::Arc;

use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use rayon::prelude::*;

use super::errors::to_pyerr;
use super::run::run_blocking;
use crate::chat::{
    tokenize_dataset as core_tokenize, ChatTokenizer, Message, PackMode, TokenizeOptions,
    TokenizedRows, TrainOn,
};
use crate::error::{Error, Result};

/// A tokenizer and its chat template, loaded as `transformers.AutoTokenizer` would load
/// them; encodes conversations into token ids and assistant-only labels.
#[pyclass(name = "ChatTokenizer", module = "ferrotune._core", frozen)]
pub struct PyChatTokenizer {
    pub inner: Arc<ChatTokenizer>,
}

fn py_err(e: Error) -> PyErr {
    Python::with_gil(|py| to_pyerr(py, e))
}

/// Reads `[{"role": str, "content": str}, ...]`; returns the messages and whether some
/// content was not a string.
pub(super) fn messages_from_py(messages: &Bound<'_, PyAny>) -> PyResult<(Vec<Message>, bool)> {
    let mut out = vec![];
    let mut non_string = false;
    for item in messages.try_iter()? {
        let item = item?;
        let get = |k: &str| -> Option<Bound<'_, PyAny>> { item.get_item(k).ok() };
        let role = get("role").and_then(|r| r.extract::<String>().ok());
        let content = get("content").and_then(|c| c.extract::<String>().ok());
        non_string |= content.is_none();
        out.push(Message {
            role: role.unwrap_or_default(),
            content: content.unwrap_or_default(),
        });
    }
    Ok((out, non_string))
}

fn ids_array(py: Python<'_>, ids: Vec<u32>) -> Bound<'_, PyArray1<i32>> {
    // Token ids are < 2^31, so the cast is lossless.
    PyArray1::from_vec(py, ids.into_iter().map(|i| i as i32).collect())
}

#[pymethods]
impl PyChatTokenizer {
    /// Loads a tokenizer from a local folder, an Azure ML MLflow model folder (with
    /// `data/tokenizer/` or `data/model/`), or a Hub model repo id (downloaded into the HF
    /// cache, honouring HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE).
    #[staticmethod]
    #[pyo3(signature = (source, revision="main".to_string(), token=None, progress=None))]
    fn from_pretrained(
        py: Python<'_>,
        source: PathBuf,
        revision: String,
        token: Option<String>,
        progress: Option<PyObject>,
    ) -> PyResult<Self> {
        let source = source.to_string_lossy().into_owned();
        let tok = run_blocking(py, progress, move |ctx| {
            ChatTokenizer::load(&source, &revision, token, ctx)
        })?;
        Ok(Self {
            inner: Arc::new(tok),
        })
    }

    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template.clone()
    }
    #[getter]
    fn bos_token(&self) -> Option<String> {
        self.inner.bos_token.clone()
    }
    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.inner.eos_token.clone()
    }
    #[getter]
    fn unk_token(&self) -> Option<String> {
        self.inner.unk_token.clone()
    }
    #[getter]
    fn pad_token(&self) -> Option<String> {
        self.inner.pad_token.clone()
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids.clone()
    }
    #[getter]
    fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_token_id
    }
    #[getter]
    fn model_max_length(&self) -> Option<usize> {
        self.inner.model_max_length
    }
    /// `min(model_max_length, max_position_embeddings)` where known.
    #[getter]
    fn default_max_seq_length(&self) -> Option<usize> {
        self.inner.default_max_seq_length()
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    /// Where the files came from.
    #[getter]
    fn origin(&self) -> String {
        self.inner.origin.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "ChatTokenizer(origin={:?}, vocab_size={}, pipeline={:?})",
            self.inner.origin,
            self.inner.vocab_size(),
            self.inner.pipeline
        )
    }

    /// The id of `token`, or None.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The conversation as text, like `apply_chat_template(messages, tokenize=False)`.
    #[pyo3(signature = (messages, add_generation_prompt=false))]
    fn render(&self, messages: &Bound<'_, PyAny>, add_generation_prompt: bool) -> PyResult<String> {
        let (msgs, _) = messages_from_py(messages)?;
        self.inner
            .render(&msgs, add_generation_prompt)
            .map_err(|e| py_err(e.into_error("render", "the conversation")))
    }

    /// Token ids of `text` as an int32 numpy array.
    #[pyo3(signature = (text, add_special_tokens=false))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        add_special_tokens: bool,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let ids = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(py_err)?;
        Ok(ids_array(py, ids))
    }

    /// Token ids of many texts (in parallel, GIL released): a list of int32 arrays.
    #[pyo3(signature = (texts, add_special_tokens=false))]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        add_special_tokens: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let tok = Arc::clone(&self.inner);
        let all: Result<Vec<Vec<u32>>> = py.allow_threads(move || {
            texts
                .par_iter()
                .map(|t| tok.encode(t, add_special_tokens))
                .collect()
        });
        let arrays: Vec<_> = all
            .map_err(py_err)?
            .into_iter()
            .map(|v| ids_array(py, v))
            .collect();
        PyList::new(py, arrays)
    }

    /// Encodes a conversation: `{"input_ids", "labels"}` int32 arrays. `input_ids` equal
    /// `apply_chat_template(messages, tokenize=True)`; labels are -100 except on the
    /// trained tokens (`train_on="assistant"`: assistant turns; `"all"`: all but the
    /// first). `max_seq_length` cuts on the right. An unusable conversation raises
    /// `ConversationError`.
    #[pyo3(signature = (messages, train_on="assistant", max_seq_length=None))]
    fn encode_chat<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        train_on: &str,
        max_seq_length: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (msgs, non_string) = messages_from_py(messages)?;
        let train_on = TrainOn::parse(train_on).map_err(py_err)?;
        let tok = Arc::clone(&self.inner);
        let enc = py
            .allow_threads(move || tok.encode_checked(&msgs, non_string, train_on, max_seq_length))
            .map_err(|e| py_err(e.into_error("encode_chat", "the conversation")))?;
        let d = PyDict::new(py);
        d.set_item("input_ids", ids_array(py, enc.input_ids))?;
        d.set_item("labels", PyArray1::from_vec(py, enc.labels))?;
        Ok(d)
    }

    /// Text of `ids`.
    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.inner.decode(&ids, skip_special_tokens).map_err(py_err)
    }
}

/// Tokenizes conversations from JSONL/Parquet files into packed (or one-per-row) training
/// rows written to `output` (.parquet or .arrow). Returns the statistics as a dict.
#[pyfunction]
#[pyo3(signature = (tokenizer, data_files, output, max_seq_length=None, mode="pack".to_string(), train_on="assistant".to_string(), strict=false, num_threads=None, pack_window=8192, revision="main".to_string(), token=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn tokenize_dataset(
    py: Python<'_>,
    tokenizer: &Bound<'_, PyAny>,
    data_files: Vec<PathBuf>,
    output: PathBuf,
    max_seq_length: Option<usize>,
    mode: String,
    train_on: String,
    strict: bool,
    num_threads: Option<usize>,
    pack_window: usize,
    revision: String,
    token: Option<String>,
    progress: Option<PyObject>,
) -> PyResult<PyObject> {
    let loaded = match tokenizer.downcast::<PyChatTokenizer>() {
        Ok(t) => Ok(Arc::clone(&t.get().inner)),
        Err(_) => Err(tokenizer
            .extract::<PathBuf>()?
            .to_string_lossy()
            .into_owned()),
    };
    // The signature's 8192 is the core's default window.
    debug_assert_eq!(crate::chat::dataset::DEFAULT_PACK_WINDOW, 8192);
    let stats = run_blocking(py, progress, move |ctx| {
        let tok = match loaded {
            Ok(t) => t,
            Err(source) => Arc::new(ChatTokenizer::load(&source, &revision, token, ctx)?),
        };
        let opts = TokenizeOptions {
            data_files,
            output,
            max_seq_length,
            mode: PackMode::parse(&mode)?,
            train_on: TrainOn::parse(&train_on)?,
            strict,
            num_threads,
            pack_window,
            records: None,
        };
        core_tokenize(&tok, &opts, ctx)
    })?;
    let d = PyDict::new(py);
    d.set_item("rows_in", stats.rows_in)?;
    d.set_item("rows_out", stats.rows_out)?;
    d.set_item("rows_written", stats.rows_written)?;
    let dropped = PyDict::new(py);
    for (k, v) in &stats.dropped {
        dropped.set_item(k, v)?;
    }
    d.set_item("dropped", dropped)?;
    d.set_item("truncated", stats.truncated)?;
    d.set_item("total_tokens", stats.total_tokens)?;
    d.set_item("trainable_tokens", stats.trainable_tokens)?;
    d.set_item("packing_efficiency", stats.packing_efficiency)?;
    let hist = PyDict::new(py);
    for (k, v) in &stats.length_histogram {
        hist.set_item(k, v)?;
    }
    d.set_item("length_histogram", hist)?;
    d.set_item("max_seq_length", stats.max_seq_length)?;
    d.set_item("output", stats.output.display().to_string())?;
    Ok(d.into_any().unbind())
}

/// Reads a tokenized dataset into flat numpy arrays (no copy out of Rust): a dict with
/// `input_ids`, `labels`, `position_ids`, `seq_lengths` (int32), `row_offsets`,
/// `seq_offsets` (int64) and `description` (JSON text or None).
#[pyfunction]
pub fn load_tokenized(py: Python<'_>, path: PathBuf) -> PyResult<PyObject> {
    let rows: TokenizedRows = run_blocking(py, None, move |_| TokenizedRows::read(&path))?;
    let d = PyDict::new(py);
    d.set_item("input_ids", PyArray1::from_vec(py, rows.input_ids))?;
    d.set_item("labels", PyArray1::from_vec(py, rows.labels))?;
    d.set_item("position_ids", PyArray1::from_vec(py, rows.position_ids))?;
    d.set_item("seq_lengths", PyArray1::from_vec(py, rows.seq_lengths))?;
    d.set_item("row_offsets", PyArray1::from_vec(py, rows.row_offsets))?;
    d.set_item("seq_offsets", PyArray1::from_vec(py, rows.seq_offsets))?;
    d.set_item("description", rows.description)?;
    Ok(d.into_any().unbind())
}
