//! [`ChatTokenizer`]: a tokenizer plus its chat template, encoding conversations into
//! token ids and labels exactly as `transformers` would tokenize them.
//!
//! Labels come from the rendered text's byte offsets, not from searching for marker
//! tokens, so they work for any template: for assistant message `j`, the trained span
//! starts where `render(messages[..j], add_generation_prompt=True)` ends (the template's
//! own assistant header) and ends where the rendering of the following message begins
//! (the longest common prefix of `render(messages[..=j])` and the whole conversation), or
//! at the end of the text for the last message (so the final EOS is trained). A token is
//! trained when it lies wholly inside a span. For Phi-3 that is the content, `<|end|>`
//! (which absorbs the newline) and the final `<|endoftext|>` — what TRL's completion-only
//! collator with `<|user|>`/`<|assistant|>` trains.

use minijinja::value::Value;
use tokenizers::{
    DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, TokenizerImpl,
};

use super::compat::{effective_tokenizer_json, Pipeline};
use super::conversation::{check_shape, to_values, DropReason, Message};
use super::files::TokenizerFiles;
use super::template::{ChatTemplate, RenderError};
use super::word_split::ChatPreTokenizer;

/// The `tokenizers` pipeline with ferrotune's pre-tokenizer slot.
pub type Backend = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    ChatPreTokenizer,
    PostProcessorWrapper,
    DecoderWrapper,
>;
use crate::error::{Error, Result};
use crate::progress::Ctx;

/// Words kept in the BPE cache (~100 bytes each).
const WORD_CACHE_CAPACITY: usize = 200_000;

/// The label value of tokens that carry no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOn {
    /// Assistant turns only (the Azure ML pipeline's and TRL's completion-only loss).
    Assistant,
    /// Every token but the first.
    All,
}

impl TrainOn {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "assistant" | "assistant_only" | "completion_only" => Ok(Self::Assistant),
            "all" => Ok(Self::All),
            _ => Err(Error::InvalidArgument(format!(
                "train_on must be 'assistant' or 'all', not {s:?}"
            ))),
        }
    }
}

/// One encoded conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChat {
    pub input_ids: Vec<u32>,
    /// `IGNORE_INDEX` or the token id, aligned with `input_ids` (the model shifts).
    pub labels: Vec<i32>,
    /// The conversation was longer than `max_seq_length` and was cut on the right.
    pub truncated: bool,
}

impl EncodedChat {
    pub fn trainable(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Why a conversation could not be encoded.
#[derive(Debug)]
pub enum ChatError {
    /// The row is dropped and counted (`detail` says more, e.g. the template's message).
    Drop(DropReason, String),
    /// Not the row's fault: the template, the tokenizer or the call is broken.
    Fatal(Error),
}

impl ChatError {
    /// As an [`Error`]: a dropped row becomes [`Error::Conversation`] at `path`/`position`.
    pub fn into_error(self, path: &str, position: &str) -> Error {
        match self {
            ChatError::Drop(reason, detail) => Error::Conversation {
                path: path.to_string(),
                position: position.to_string(),
                reason: reason.key(),
                detail: if detail.is_empty() {
                    reason.describe().to_string()
                } else {
                    detail
                },
            },
            ChatError::Fatal(e) => e,
        }
    }
}

impl From<Error> for ChatError {
    fn from(e: Error) -> Self {
        ChatError::Fatal(e)
    }
}

/// A tokenizer with its chat template and special tokens, loaded like
/// `transformers.AutoTokenizer.from_pretrained`.
pub struct ChatTokenizer {
    tokenizer: Backend,
    template: Option<ChatTemplate>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    /// EOS ids for generation: generation_config.json's `eos_token_id`, else the EOS token.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub model_max_length: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub clean_up_tokenization_spaces: bool,
    pub pipeline: Pipeline,
    /// Where the files came from.
    pub origin: String,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("origin", &self.origin)
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

impl ChatTokenizer {
    /// Builds the tokenizer from its files.
    pub fn from_files(files: &TokenizerFiles) -> Result<Self> {
        let (json, pipeline) = effective_tokenizer_json(files);
        let mut tokenizer = Backend::from_bytes(serde_json::to_vec(&json).expect("a JSON value"))
            .map_err(|e| {
            Error::data_format(
                format!("{}/tokenizer.json", files.origin),
                format!("not a tokenizer the `tokenizers` library can load: {e}"),
            )
        })?;
        // transformers (re-)adds the named special tokens to the backend as special tokens,
        // which makes decode(skip_special_tokens=True) drop them; do the same.
        tokenizer.add_special_tokens(&named_special_tokens(files));
        if let ModelWrapper::BPE(bpe) = tokenizer.get_model() {
            // With words split (compat::split_words_where_exact) the BPE cache does most of
            // the work; the default 10k words fill up early on a large dataset.
            let mut bpe = bpe.clone();
            bpe.resize_cache(WORD_CACHE_CAPACITY);
            tokenizer.with_model(bpe);
        }
        let special = |name| files.special_token(name);
        let (bos, eos, unk, pad) = (
            special("bos_token"),
            special("eos_token"),
            special("unk_token"),
            special("pad_token"),
        );
        let mut vars: Vec<(&'static str, String)> = vec![];
        for (k, v) in [
            ("bos_token", &bos),
            ("eos_token", &eos),
            ("unk_token", &unk),
            ("pad_token", &pad),
        ] {
            if let Some(v) = v {
                vars.push((k, v.clone()));
            }
        }
        let chat_template = files.chat_template()?;
        let template = chat_template
            .as_deref()
            .map(|src| ChatTemplate::new(src, vars, &files.origin))
            .transpose()?;
        let id = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let eos_token_ids = files
            .generation_eos_ids()
            .filter(|v| !v.is_empty())
            .or_else(|| id(&eos).map(|i| vec![i]))
            .unwrap_or_default();
        Ok(Self {
            pad_token_id: id(&pad),
            template,
            chat_template,
            bos_token: bos,
            eos_token: eos,
            unk_token: unk,
            pad_token: pad,
            eos_token_ids,
            model_max_length: files.model_max_length(),
            max_position_embeddings: files.max_position_embeddings(),
            clean_up_tokenization_spaces: files
                .config_bool("clean_up_tokenization_spaces")
                .unwrap_or(false),
            pipeline,
            origin: files.origin.clone(),
            tokenizer,
        })
    }

    /// Loads from a local folder, an Azure ML MLflow model folder or a Hub model repo id.
    pub fn load(source: &str, revision: &str, token: Option<String>, ctx: &Ctx) -> Result<Self> {
        let files = TokenizerFiles::load(
            source,
            revision,
            || crate::hub::HubClient::from_env(token),
            ctx,
        )?;
        Self::from_files(&files)
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &Backend {
        &self.tokenizer
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// `min(model_max_length, max_position_embeddings)`, whichever are known.
    pub fn default_max_seq_length(&self) -> Option<usize> {
        match (self.model_max_length, self.max_position_embeddings) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            Error::Template(format!(
                "{}: the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)",
                self.origin
            ))
        })
    }

    fn render_values(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, ChatError> {
        let t = self.template()?;
        t.render(&Value::from(messages.to_vec()), add_generation_prompt)
            .map_err(|e| match e {
                RenderError::Raised(m) => ChatError::Drop(DropReason::TemplateError, m),
                RenderError::Failed(m) => ChatError::Fatal(Error::Template(format!(
                    "{}: the chat template failed on this conversation: {m}",
                    self.origin
                ))),
            })
    }

    /// Renders `messages` like `apply_chat_template(messages, tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, ChatError> {
        self.render_values(&to_values(messages), add_generation_prompt)
    }

    /// Token ids of `text` (with the tokenizer's post-processor when `add_special_tokens`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::InvalidArgument(format!("could not tokenize the text: {e}")))
    }

    /// Text of `ids` as transformers' `decode` returns it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::InvalidArgument(format!("could not decode the ids: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Encodes a conversation: ids equal to `apply_chat_template(messages, tokenize=True)`,
    /// labels per `train_on`, cut on the right to `max_seq_length`.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        train_on: TrainOn,
        max_seq_length: Option<usize>,
    ) -> std::result::Result<EncodedChat, ChatError> {
        let values = to_values(messages);
        let text = self.render_values(&values, false)?;
        let spans = match train_on {
            TrainOn::Assistant => self.assistant_spans(messages, &values, &text)?,
            TrainOn::All => vec![],
        };
        let enc = self.tokenizer.encode(text.as_str(), false).map_err(|e| {
            Error::InvalidArgument(format!("could not tokenize the conversation: {e}"))
        })?;
        let mut input_ids = enc.get_ids().to_vec();
        let mut labels: Vec<i32> = match train_on {
            TrainOn::All => input_ids.iter().map(|&i| i as i32).collect(),
            TrainOn::Assistant => label_by_spans(&input_ids, enc.get_offsets(), &spans),
        };
        if let Some(first) = labels.first_mut() {
            // Nothing predicts the first token; packing relies on this too.
            *first = IGNORE_INDEX;
        }
        let mut truncated = false;
        if let Some(max) = max_seq_length {
            if input_ids.len() > max {
                input_ids.truncate(max);
                labels.truncate(max);
                truncated = true;
            }
        }
        let out = EncodedChat {
            input_ids,
            labels,
            truncated,
        };
        if out.trainable() == 0 {
            return Err(ChatError::Drop(
                DropReason::NoTrainableTokens,
                format!("{} tokens, none of them trainable", out.input_ids.len()),
            ));
        }
        Ok(out)
    }

    /// Checks the conversation's shape, then encodes it.
    pub fn encode_checked(
        &self,
        messages: &[Message],
        non_string_content: bool,
        train_on: TrainOn,
        max_seq_length: Option<usize>,
    ) -> std::result::Result<EncodedChat, ChatError> {
        check_shape(messages, non_string_content)
            .map_err(|r| ChatError::Drop(r, r.describe().to_string()))?;
        self.encode_chat(messages, train_on, max_seq_length)
    }

    /// Byte spans of `text` that carry loss, one per assistant message.
    fn assistant_spans(
        &self,
        messages: &[Message],
        values: &[Value],
        text: &str,
    ) -> std::result::Result<Vec<(usize, usize)>, ChatError> {
        let mut spans = vec![];
        for (j, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prompt = self.render_values(&values[..j], true)?;
            if !text.starts_with(&prompt) {
                return Err(ChatError::Fatal(Error::Template(format!(
                    "{}: the chat template's rendering of the messages before an assistant turn (with add_generation_prompt=True) is not a prefix of the whole conversation's rendering, so the assistant turns cannot be located; use train_on='all' with this template",
                    self.origin
                ))));
            }
            let start = prompt.len();
            let end = if j + 1 == messages.len() {
                text.len()
            } else {
                let upto = self.render_values(&values[..=j], false)?;
                common_prefix(&upto, text)
            };
            if end > start {
                spans.push((start, end));
            }
        }
        Ok(spans)
    }
}

/// bos/eos/unk/pad and the additional special tokens of tokenizer_config.json (or
/// special_tokens_map.json), marked special. A token that is already an added token keeps
/// its flags (lstrip, rstrip, ...) as transformers keeps them; otherwise the flags of the
/// AddedToken object in the config, or none for a plain string.
fn named_special_tokens(files: &TokenizerFiles) -> Vec<tokenizers::AddedToken> {
    use serde_json::Value as J;
    let existing = |content: &str| -> Option<&serde_json::Map<String, J>> {
        files
            .tokenizer_json
            .get("added_tokens")?
            .as_array()?
            .iter()
            .filter_map(J::as_object)
            .find(|o| o.get("content").and_then(J::as_str) == Some(content))
    };
    let token = |v: &J| -> Option<tokenizers::AddedToken> {
        let (content, given) = match v {
            J::String(s) => (s.as_str(), None),
            J::Object(o) => (o.get("content")?.as_str()?, Some(o)),
            _ => return None,
        };
        let flags = existing(content).or(given);
        let flag = |k: &str| {
            flags
                .and_then(|o| o.get(k))
                .and_then(J::as_bool)
                .unwrap_or(false)
        };
        Some(
            tokenizers::AddedToken::from(content.to_string(), true)
                .single_word(flag("single_word"))
                .lstrip(flag("lstrip"))
                .rstrip(flag("rstrip"))
                .normalized(flag("normalized")),
        )
    };
    let lookup = |k: &str| {
        files
            .config
            .get(k)
            .or_else(|| files.special_tokens_map.get(k))
    };
    let mut out: Vec<_> = ["bos_token", "eos_token", "unk_token", "pad_token"]
        .iter()
        .filter_map(|k| lookup(k).and_then(token))
        .collect();
    for k in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(J::Array(list)) = lookup(k) {
            out.extend(list.iter().filter_map(token));
        }
    }
    out
}

/// Length in bytes of the longest common prefix, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a
        .as_bytes()
        .iter()
        .zip(b.as_bytes())
        .take_while(|(x, y)| x == y)
        .count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// Labels: the id for tokens wholly inside a span, `IGNORE_INDEX` elsewhere. Spans and
/// offsets are both sorted, so one pass suffices.
fn label_by_spans(ids: &[u32], offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<i32> {
    let mut out = Vec::with_capacity(ids.len());
    let mut k = 0;
    for (&id, &(start, end)) in ids.iter().zip(offsets) {
        // Token starts never decrease, so a span that ends before this token starts is done.
        while k < spans.len() && spans[k].1 <= start {
            k += 1;
        }
        let inside = k < spans.len() && start >= spans[k].0 && end <= spans[k].1;
        out.push(if inside { id as i32 } else { IGNORE_INDEX });
    }
    out
}

/// transformers' `clean_up_tokenization` (spaces before punctuation and contractions).
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
