//! Text generation with our Phi-3: chat prompts, a KV cache per conversation, batched
//! decoding, greedy or sampled tokens, stop on the model's EOS ids, streamed text.
//!
//! Several conversations run together: the prefill is one packed forward (attention
//! stays inside each conversation), then every decoding step runs the still-active
//! conversations' new tokens as one flat batch, so the projections see one GEMM per
//! step whatever the number of conversations.

pub mod sampling;
pub mod stream;

use std::path::Path;

use std::sync::Arc;

use serde::Serialize;

use crate::chat::{ChatTokenizer, Message};
use crate::error::{Error, Result};
use crate::hub::HubClient;
use crate::kernels::{Backend, KvCache};
use crate::model::{self, Phi3};
use crate::progress::Ctx;
pub use sampling::{GenerateParams, Sampler};
use stream::TextStream;

/// Why a conversation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// It produced one of the model's EOS tokens.
    Stop,
    /// `max_new_tokens`, or the model's context, ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One conversation's result.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The generated text (special tokens removed, the EOS not included).
    pub text: String,
    /// The generated ids, without the final EOS.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
}

/// A loaded model and tokenizer, ready to generate.
pub struct Generator {
    model: Phi3,
    tokenizer: ChatTokenizer,
    eos: Vec<u32>,
}

/// The tag transformers appends to a final message it is asked to continue, to find where
/// that message ends in the rendered text.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

impl Generator {
    /// Loads `model` (a folder, an Azure ML MLflow folder or a Hub repo id), with the PEFT
    /// adapter in folder `adapter` on top when given (kept unmerged, as PEFT runs it).
    pub fn load(
        model: &str,
        adapter: Option<&Path>,
        be: Arc<dyn Backend>,
        token: Option<String>,
        ctx: &Ctx,
    ) -> Result<Self> {
        let hub_token = token.clone();
        let folder =
            model::weights::resolve_model(model, "main", || HubClient::from_env(hub_token), ctx)?;
        // A local source is passed as given so that an MLflow folder finds data/tokenizer/;
        // a Hub repo was just fetched into `folder` with its tokenizer files.
        let tok_source = if Path::new(model).exists() {
            model.to_string()
        } else {
            folder.display().to_string()
        };
        let tokenizer = ChatTokenizer::load(&tok_source, "main", token, ctx)?;
        let phi3 = match adapter {
            Some(dir) => {
                let cfg = model::export::read_adapter_config(dir)?;
                let m = Phi3::load(&folder, cfg, 0, be)?;
                m.load_adapter(dir)?;
                m
            }
            None => Phi3::load_frozen(&folder, be)?,
        };
        Self::new(phi3, tokenizer)
    }

    /// A generator over an already loaded model and its tokenizer.
    pub fn new(model: Phi3, tokenizer: ChatTokenizer) -> Result<Self> {
        let mut eos = tokenizer.eos_token_ids.clone();
        if eos.is_empty() {
            // config.json's eos_token_id: an int or a list
            match model.cfg.raw.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
        }
        if eos.is_empty() {
            return Err(Error::Model(format!(
                "{}: no EOS token id in generation_config.json, config.json or the tokenizer; generation would never stop",
                model.folder.display()
            )));
        }
        Ok(Self {
            model,
            tokenizer,
            eos,
        })
    }

    pub fn model(&self) -> &Phi3 {
        &self.model
    }

    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// The ids that end a reply.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The longest sequence (prompt + reply) the model handles.
    pub fn max_context(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }

    /// The prompt ids for a conversation, as transformers' chat pipeline builds them: the
    /// template with the generation prompt, or, when the last message is the assistant's,
    /// that message left open so the reply continues it (`continue_final_message`).
    pub fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        check_conversation(messages)?;
        let text = match messages.last() {
            Some(last) if last.role == "assistant" => {
                let mut tagged = messages.to_vec();
                tagged
                    .last_mut()
                    .expect("non-empty")
                    .content
                    .push_str(CONTINUE_TAG);
                let rendered = self.render(&tagged, false)?;
                let tag = CONTINUE_TAG.trim_end();
                let at = rendered.rfind(tag).ok_or_else(|| {
                    Error::Template(format!(
                        "{}: the chat template drops part of the final assistant message, so the reply cannot continue it",
                        self.tokenizer.origin
                    ))
                })?;
                if rendered[at..].starts_with(CONTINUE_TAG) {
                    rendered[..at].to_string()
                } else {
                    rendered[..at].trim_end().to_string()
                }
            }
            _ => self.render(messages, true)?,
        };
        self.tokenizer.encode(&text, false)
    }

    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.tokenizer
            .render(messages, add_generation_prompt)
            .map_err(|e| match e {
                crate::chat::tokenizer::ChatError::Drop(_, m) => Error::Template(format!(
                    "{}: the chat template refused the conversation: {m}",
                    self.tokenizer.origin
                )),
                crate::chat::tokenizer::ChatError::Fatal(e) => e,
            })
    }

    /// Generates replies to `conversations`. With `stream`, the text of every conversation
    /// is sent as it forms through `ctx` (`Progress::text`, id = the conversation's index).
    pub fn generate(
        &self,
        conversations: &[Vec<Message>],
        params: &GenerateParams,
        stream: bool,
        ctx: &Ctx,
    ) -> Result<Vec<Completion>> {
        let prompts = conversations
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.prompt(c).map_err(|e| match e {
                    Error::InvalidArgument(m) => {
                        Error::InvalidArgument(format!("conversation {i}: {m}"))
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut streams: Vec<TextStream> =
            (0..prompts.len()).map(|_| TextStream::default()).collect();
        let raw = self.generate_ids(&prompts, params, ctx, &mut |i, id| {
            if stream && !self.eos.contains(&id) {
                if let Some(piece) = streams[i].push(&self.tokenizer, id)? {
                    ctx.text(i as u64, &piece);
                }
            }
            Ok(())
        })?;
        raw.into_iter()
            .zip(prompts)
            .enumerate()
            .map(|(i, ((ids, finish_reason), prompt))| {
                let text = self.tokenizer.decode(&ids, true)?;
                if stream {
                    if let Some(rest) = streams[i].finish(&text) {
                        ctx.text(i as u64, &rest);
                    }
                }
                Ok(Completion {
                    text,
                    token_ids: ids,
                    finish_reason,
                    prompt_tokens: prompt.len(),
                })
            })
            .collect()
    }

    /// The core loop on token ids: returns each prompt's new ids (without the final EOS)
    /// and why it stopped. `on_token(i, id)` sees every new id of prompt `i`, EOS included.
    pub fn generate_ids(
        &self,
        prompts: &[Vec<u32>],
        params: &GenerateParams,
        ctx: &Ctx,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<Vec<(Vec<u32>, FinishReason)>> {
        params.validate()?;
        let vocab = self.model.cfg.vocab_size;
        let max_ctx = self.max_context();
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::InvalidArgument(format!("prompt {i} is empty")));
            }
            if p.len() >= max_ctx {
                return Err(Error::InvalidArgument(format!(
                    "prompt {i} has {} tokens; the model's context is {max_ctx} tokens, which leaves no room for a reply",
                    p.len()
                )));
            }
            if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidArgument(format!(
                    "prompt {i}: token id {t} is outside the model's vocabulary ({vocab})"
                )));
            }
        }
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut samplers: Vec<Sampler> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Sampler::new(seed, i as u64, p, vocab))
            .collect();
        let mut out: Vec<(Vec<u32>, Option<FinishReason>)> =
            prompts.iter().map(|_| (Vec::new(), None)).collect();
        if prompts.is_empty() {
            return Ok(vec![]);
        }
        let task = ctx.task("generating", Some(params.max_new_tokens as u64), "tokens");
        let cache_capacity = |i: usize| (prompts[i].len() + params.max_new_tokens).min(max_ctx);
        let mut caches: Vec<_> = (0..prompts.len())
            .map(|i| self.model.new_cache(cache_capacity(i)))
            .collect::<Result<_>>()?;
        // Prefill: every prompt in one packed forward.
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        let mut step_ids: Vec<u32> = prompts.concat();
        let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut past: Vec<usize> = vec![0; prompts.len()];
        for step in 0..params.max_new_tokens {
            ctx.check()?;
            let b = self.model.batch_after(&step_ids, &lens, &past)?;
            // `active` is ascending: pick the active caches in order.
            let mut running: Vec<&mut KvCache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.binary_search(i).is_ok())
                .map(|(_, c)| c)
                .collect();
            let logits = self.model.forward_cached(&b, &mut running)?;
            let mut next_active = Vec::with_capacity(active.len());
            step_ids.clear();
            lens.clear();
            past.clear();
            for (&i, mut row) in active.iter().zip(logits) {
                let t = samplers[i].next(&mut row, params);
                on_token(i, t)?;
                let total = prompts[i].len() + out[i].0.len() + 1;
                if self.eos.contains(&t) {
                    out[i].1 = Some(FinishReason::Stop);
                    continue;
                }
                out[i].0.push(t);
                if step + 1 == params.max_new_tokens || total >= max_ctx {
                    out[i].1 = Some(FinishReason::Length);
                    continue;
                }
                next_active.push(i);
                let cached = caches[i].len();
                if self.crosses_long_rope(cached) {
                    // LongRoPE switches to its long factors here: like transformers' Phi-3,
                    // drop the cache and run the whole sequence again with them.
                    caches[i] = self.model.new_cache(cache_capacity(i))?;
                    step_ids.extend_from_slice(&prompts[i]);
                    step_ids.extend_from_slice(&out[i].0);
                    lens.push(prompts[i].len() + out[i].0.len());
                    past.push(0);
                } else {
                    step_ids.push(t);
                    lens.push(1);
                    past.push(cached);
                }
            }
            task.advance(1);
            active = next_active;
            if active.is_empty() {
                break;
            }
        }
        Ok(out
            .into_iter()
            .map(|(ids, r)| (ids, r.unwrap_or(FinishReason::Length)))
            .collect())
    }
}

impl Generator {
    /// Whether feeding one more token to a sequence with `cached` tokens takes it past
    /// LongRoPE's `original_max_position_embeddings` for the first time.
    fn crosses_long_rope(&self, cached: usize) -> bool {
        self.model
            .cfg
            .longrope
            .as_ref()
            .is_some_and(|l| cached == l.original_max_position_embeddings)
    }
}

/// A conversation generation can start from: non-empty, known roles.
fn check_conversation(messages: &[Message]) -> Result<()> {
    if messages.is_empty() {
        return Err(Error::InvalidArgument(
            "the conversation is empty; give at least one message".into(),
        ));
    }
    for (j, m) in messages.iter().enumerate() {
        if !crate::chat::conversation::ROLES.contains(&m.role.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "message {j} has role {:?}; use one of {}",
                m.role,
                crate::chat::conversation::ROLES.join(", ")
            )));
        }
    }
    Ok(())
}
