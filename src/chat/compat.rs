//! Which tokenizer pipeline `transformers` actually runs for a folder.
//!
//! `transformers` 5.x does not always use `tokenizer.json` as written. For
//! `tokenizer_class: LlamaTokenizer` it rebuilds the pipeline from the vocabulary and merges:
//! no normalizer, a `Metaspace` pre-tokenizer whose `prepend_scheme` follows `legacy` and
//! `add_prefix_space` (`legacy: false` → "first": `<|user|>\nHello` encodes `Hello`, not
//! `▁Hello`), and a matching decoder. But for model types it lists as having a wrong
//! `tokenizer_class` on the Hub (Phi-3 among them, when the folder has the model's
//! `config.json`), and for ByteLevel tokenizers, it loads `tokenizer.json` as is.
//!
//! This module mirrors that choice (transformers 5.24.0, `AutoTokenizer.from_pretrained`)
//! by editing the JSON before the `tokenizers` crate loads it, so ferrotune's ids equal
//! the ids a `transformers` user gets from the same folder.

use serde_json::{json, Value};

use super::files::TokenizerFiles;

/// Model types for which transformers 5.24 ignores the Hub's `tokenizer_class` and loads
/// `tokenizer.json` unchanged (`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`, the entries
/// relevant to chat fine-tuning).
const RAW_TOKENIZER_MODEL_TYPES: &[&str] = &[
    "phi3",
    "phi3_v",
    "phimoe",
    "qwen2",
    "qwen3_5",
    "qwen3_5_moe",
    "internlm2",
    "internlm3",
    "jamba",
    "nemotron",
    "llava",
    "llava_next",
    "minicpm3",
    "modernbert",
];

/// How the pipeline was chosen, for messages and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipeline {
    /// `tokenizer.json` as written.
    AsWritten,
    /// transformers' `LlamaTokenizer` rebuild (Metaspace pre-tokenizer).
    LlamaRebuild,
}

fn is_byte_level(tok: &Value) -> bool {
    let has = |v: Option<&Value>| {
        v.map(|v| v.to_string().contains("\"ByteLevel\""))
            .unwrap_or(false)
    };
    has(tok.get("pre_tokenizer")) || has(tok.get("decoder"))
}

/// Picks the pipeline transformers would use for these files.
pub fn pipeline_for(files: &TokenizerFiles) -> Pipeline {
    let class = files
        .config
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .map(|c| c.trim_end_matches("Fast"));
    let model_type = files.model_type();
    if model_type.is_some_and(|m| RAW_TOKENIZER_MODEL_TYPES.contains(&m)) {
        return Pipeline::AsWritten;
    }
    let llama = match class {
        Some(c) => c == "LlamaTokenizer",
        None => model_type == Some("llama"),
    };
    let bpe = files
        .tokenizer_json
        .pointer("/model/type")
        .and_then(Value::as_str)
        == Some("BPE");
    if llama && bpe && !is_byte_level(&files.tokenizer_json) {
        Pipeline::LlamaRebuild
    } else {
        Pipeline::AsWritten
    }
}

/// The `tokenizer.json` transformers effectively runs.
pub fn effective_tokenizer_json(files: &TokenizerFiles) -> (Value, Pipeline) {
    let mut tok = files.tokenizer_json.clone();
    let pipeline = pipeline_for(files);
    if pipeline == Pipeline::LlamaRebuild {
        let add_prefix_space = files.config_bool("add_prefix_space").unwrap_or(true);
        // LlamaTokenizer's own default is legacy=False.
        let legacy = files.config_bool("legacy").unwrap_or(false);
        let scheme = match (add_prefix_space, legacy) {
            (true, false) => "first",
            (true, true) => "always",
            (false, _) => "never",
        };
        tok["normalizer"] = Value::Null;
        tok["pre_tokenizer"] = json!({
            "type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false
        });
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_prefix_space {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        tok["decoder"] = json!({"type": "Sequence", "decoders": decoders});
        if let Some(model) = tok.get_mut("model").and_then(Value::as_object_mut) {
            model.insert("unk_token".into(), Value::Null);
            model.insert("fuse_unk".into(), Value::Bool(true));
            model.insert("byte_fallback".into(), Value::Bool(true));
            model.insert("dropout".into(), Value::Null);
            model.insert("ignore_merges".into(), Value::Bool(false));
        }
    }
    if tok.get("post_processor").is_none_or(Value::is_null) {
        tok["post_processor"] = template_post_processor(files);
    }
    split_words_where_exact(&mut tok);
    (tok, pipeline)
}

/// The word-boundary marker of SentencePiece-style vocabularies.
const SPACE: char = '\u{2581}';

/// Speeds up SentencePiece-style BPE (Llama, Phi-3, Mistral) without changing a single id.
///
/// These tokenizers run BPE over a whole message at once (no pre-tokenizer split), so the
/// BPE word cache never hits and long texts pay the full merge cost: about 2 MB/s per
/// core. When no vocabulary entry has a `▁` right after another character — true of
/// every SentencePiece BPE vocabulary, whose pieces only start with `▁`s — no merge can
/// join two words, so cutting the text before each run of `▁` and running BPE per word
/// gives the same tokens (and offsets), and common words come from the cache. The
/// condition is checked on the vocabulary; otherwise the pipeline is left as is.
pub fn split_words_where_exact(tok: &mut Value) -> bool {
    let Some(model) = tok.get("model") else {
        return false;
    };
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return false;
    }
    let Some(vocab) = model.get("vocab").and_then(Value::as_object) else {
        return false;
    };
    let joins_words = |t: &str| {
        let mut prev: Option<char> = None;
        t.chars().any(|c| {
            let hit = c == SPACE && prev.is_some_and(|p| p != SPACE);
            prev = Some(c);
            hit
        })
    };
    if vocab.keys().any(|t| joins_words(t)) {
        return false;
    }
    // Spaces must already be `▁` when the pre-tokenizer runs: a Metaspace pre-tokenizer
    // that does not split, or no pre-tokenizer after a normalizer that replaces spaces.
    let pre = tok.get("pre_tokenizer").cloned().unwrap_or(Value::Null);
    let exact = match pre.get("type").and_then(Value::as_str) {
        Some("Metaspace") => pre.get("split").and_then(Value::as_bool) == Some(false),
        None => pre.is_null() && normalizer_replaces_spaces(tok.get("normalizer")),
        _ => false,
    };
    if exact {
        // See word_split.rs: the library's regex Split step would be exact too, but slow.
        tok["pre_tokenizer"] = json!({"type": "FerrotuneWordSplit", "inner": pre});
    }
    exact
}

fn normalizer_replaces_spaces(n: Option<&Value>) -> bool {
    let Some(n) = n else { return false };
    let is_replace = |n: &Value| {
        n.get("type").and_then(Value::as_str) == Some("Replace")
            && n.pointer("/pattern/String").and_then(Value::as_str) == Some(" ")
            && n.get("content").and_then(Value::as_str) == Some("\u{2581}")
    };
    match n.get("type").and_then(Value::as_str) {
        Some("Sequence") => n
            .get("normalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(is_replace)),
        _ => is_replace(n),
    }
}

/// transformers' `update_post_processor`: BOS/EOS around each sequence as
/// `add_bos_token` / `add_eos_token` say.
fn template_post_processor(files: &TokenizerFiles) -> Value {
    let id_of = |t: &str| {
        files
            .tokenizer_json
            .get("added_tokens")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .find(|x| x.get("content").and_then(Value::as_str) == Some(t))
            })
            .and_then(|x| x.get("id").cloned())
            .or_else(|| {
                files
                    .tokenizer_json
                    .pointer("/model/vocab")
                    .and_then(|v| v.get(t).cloned())
            })
    };
    let mut special = serde_json::Map::new();
    let mut enabled = |flag: &str, token_name: &str| -> Option<String> {
        if !files.config_bool(flag).unwrap_or(false) {
            return None;
        }
        let token = files.special_token(token_name)?;
        let id = id_of(&token)?;
        special.insert(
            token.clone(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
        Some(token)
    };
    let bos = enabled("add_bos_token", "bos_token");
    let eos = enabled("add_eos_token", "eos_token");
    let piece = |seq: &str, type_id: u32| {
        let mut out = vec![];
        if let Some(b) = &bos {
            out.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
        }
        out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some(e) = &eos {
            out.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
        }
        out
    };
    let single = piece("A", 0);
    let pair = [piece("A", 0), piece("B", 1)].concat();
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}
