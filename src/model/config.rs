//! The Phi-3 configuration, read from a Hugging Face `config.json`.
//!
//! Covers Phi-3-mini-4k and the 128k / Phi-3.5 variants whose `rope_scaling` is `longrope`
//! (short and long frequency factors plus an attention-scaling factor on cos/sin).

use serde::Deserialize;

use crate::error::{Error, Result};

/// LongRoPE parameters (`rope_scaling` with type `longrope`, or the older `su`).
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    /// Multiplies cos and sin: `sqrt(1 + ln(factor) / ln(original))` unless given.
    pub attention_factor: f64,
}

/// What ferrotune needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub longrope: Option<LongRope>,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// The weights' dtype as saved (`torch_dtype` / `dtype`), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    /// The raw JSON, kept so exports can write it back with only what changed.
    pub raw: serde_json::Value,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    original_max_position_embeddings: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    hidden_act: Option<String>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-5
}

impl Phi3Config {
    /// Parses `config.json` text; `source` names the file in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let bad = |m: String| Error::Model(format!("{source}: {m}"));
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let raw: Raw = serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("not a Phi-3 config ({e})")))?;
        if let Some(t) = &raw.model_type {
            if t != "phi3" {
                return Err(bad(format!(
                    "model_type is '{t}'; ferrotune trains Phi-3 models (model_type 'phi3')"
                )));
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act '{act}' is not supported (Phi-3 uses silu)"
                )));
            }
        }
        if raw.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return Err(bad("partial_rotary_factor != 1 is not supported yet".into()));
        }
        let heads = raw.num_attention_heads;
        if heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 || raw.vocab_size == 0 {
            return Err(bad("sizes must be positive".into()));
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {head_dim} must be even and positive"
            )));
        }
        // transformers 5 moved rope settings into `rope_parameters`; older files have
        // `rope_theta` + `rope_scaling`. Accept both.
        let params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let scaling = raw
            .rope_scaling
            .clone()
            .filter(|v| !v.is_null())
            .or_else(|| params.cloned().filter(|p| p.get("short_factor").is_some()));
        let longrope = match scaling {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "longrope" | "su" => Some(parse_longrope(&s, &raw, head_dim).map_err(bad)?),
                    other => {
                        return Err(bad(format!(
                        "rope scaling type '{other}' is not supported (default and longrope are)"
                    )))
                    }
                }
            }
        };
        Ok(Phi3Config {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            longrope,
            sliding_window: raw.sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            raw: value,
        })
    }

    /// Output width of each projection ferrotune can put LoRA on, and its input width.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        match module {
            "qkv_proj" => Some((q + 2 * kv, h)),
            "o_proj" => Some((h, q)),
            "gate_up_proj" => Some((2 * i, h)),
            "down_proj" => Some((h, i)),
            _ => None,
        }
    }

    /// Inverse frequencies for a sequence of `len` positions (LongRoPE switches to its long
    /// factors past `original_max_position_embeddings`, as transformers does).
    pub fn inv_freq(&self, len: usize) -> Vec<f64> {
        let dim = self.head_dim;
        (0..dim / 2)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf((2 * i) as f64 / dim as f64);
                match &self.longrope {
                    Some(lr) if len > lr.original_max_position_embeddings => {
                        base / lr.long_factor[i]
                    }
                    Some(lr) => base / lr.short_factor[i],
                    None => base,
                }
            })
            .collect()
    }

    /// The factor on cos/sin (1 without LongRoPE).
    pub fn attention_factor(&self) -> f64 {
        self.longrope.as_ref().map_or(1.0, |l| l.attention_factor)
    }
}

fn parse_longrope(
    s: &serde_json::Value,
    raw: &Raw,
    head_dim: usize,
) -> std::result::Result<LongRope, String> {
    let factors = |key: &str| -> std::result::Result<Vec<f64>, String> {
        let v = s
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| format!("longrope rope_scaling needs a '{key}' list"))?;
        let f: Vec<f64> = v.iter().filter_map(|x| x.as_f64()).collect();
        if f.len() != v.len() || f.len() != head_dim / 2 {
            return Err(format!(
                "longrope '{key}' must hold head_dim/2 = {} numbers, found {}",
                head_dim / 2,
                v.len()
            ));
        }
        Ok(f)
    };
    let original = s
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .or(raw.original_max_position_embeddings)
        .ok_or("longrope needs original_max_position_embeddings")?;
    let factor = s
        .get("factor")
        .and_then(|v| v.as_f64())
        .unwrap_or(raw.max_position_embeddings as f64 / original as f64);
    let attention_factor = match s.get("attention_factor").and_then(|v| v.as_f64()) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"{"model_type":"phi3","vocab_size":32064,"hidden_size":3072,
        "intermediate_size":8192,"num_hidden_layers":32,"num_attention_heads":32,
        "num_key_value_heads":32,"max_position_embeddings":4096,"rms_norm_eps":1e-05,
        "rope_theta":10000.0,"rope_scaling":null,"sliding_window":2047,"hidden_act":"silu",
        "torch_dtype":"bfloat16","tie_word_embeddings":false}"#;

    #[test]
    fn phi3_mini() {
        let c = Phi3Config::from_json(MINI, "config.json").unwrap();
        assert_eq!(c.head_dim, 96);
        assert_eq!(c.linear_shape("qkv_proj"), Some((9216, 3072)));
        assert_eq!(c.linear_shape("gate_up_proj"), Some((16384, 3072)));
        assert_eq!(c.attention_factor(), 1.0);
        let f = c.inv_freq(10);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 10000f64.powf(-2.0 / 96.0)).abs() < 1e-15);
    }

    #[test]
    fn longrope_factor_and_switch() {
        let short: Vec<f64> = vec![1.0; 48];
        let long: Vec<f64> = vec![2.0; 48];
        let text = MINI.replace("\"rope_scaling\":null", &format!(
            "\"rope_scaling\":{{\"type\":\"longrope\",\"short_factor\":{short:?},\"long_factor\":{long:?}}},\"original_max_position_embeddings\":4096"
        )).replace("\"max_position_embeddings\":4096", "\"max_position_embeddings\":131072");
        let c = Phi3Config::from_json(&text, "c").unwrap();
        let lr = c.longrope.as_ref().unwrap();
        let expect = (1.0 + (32.0f64).ln() / (4096f64).ln()).sqrt();
        assert!((lr.attention_factor - expect).abs() < 1e-12);
        assert_eq!(c.inv_freq(4096)[0], 1.0);
        assert_eq!(c.inv_freq(4097)[0], 0.5);
    }

    #[test]
    fn rejects_other_models() {
        let e = Phi3Config::from_json(&MINI.replace("phi3", "llama"), "x/config.json").unwrap_err();
        assert!(e.to_string().contains("model_type is 'llama'"), "{e}");
        let e = Phi3Config::from_json("{", "c").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"));
    }
}
