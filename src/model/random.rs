//! Random-weight Phi-3 model folders: the demo's offline model, and full-size shapes for
//! benchmarks without a download.
//!
//! The folder is what `save_pretrained` writes: `config.json` (Phi-3-mini-4k-instruct's,
//! with the caller's overrides), `model.safetensors`, `generation_config.json` and, when a
//! tokenizer folder is given, its files. Weights follow transformers' `_init_weights` for
//! Phi-3: every linear and the embedding ~ N(0, `initializer_range`), norms = 1.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::config::Phi3Config;
use super::export::{write_safetensors, PendingDir};
use super::weights::SIDE_FILES;
use crate::error::{Error, IoContext, Result};

/// Phi-3-mini-4k-instruct's config.json (the fields transformers reads).
fn phi3_mini_config() -> Value {
    json!({
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": 32064
    })
}

/// Normal(0, std) values from `rng` (Box-Muller; the `rand` crate alone has no normal).
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f32::consts::TAU * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

/// Writes a random Phi-3 folder at `dir`: Phi-3-mini's config with `overrides` (a JSON
/// object, e.g. `{"hidden_size": 64, "num_hidden_layers": 2}`) applied, weights drawn from
/// `seed`, and the tokenizer files of `tokenizer` copied when given. Returns `dir`.
pub fn create_random_model(
    dir: &Path,
    overrides: &Value,
    seed: u64,
    tokenizer: Option<&Path>,
) -> Result<PathBuf> {
    let mut cfg_json = phi3_mini_config();
    let Some(over) = overrides.as_object() else {
        return Err(Error::InvalidArgument(
            "the config overrides must be a JSON object".into(),
        ));
    };
    for (k, v) in over {
        cfg_json[k] = v.clone();
    }
    let text = serde_json::to_string_pretty(&cfg_json).expect("a JSON value");
    let cfg = Phi3Config::from_json(&text, "the random model's config")?;
    let std = cfg_json["initializer_range"].as_f64().unwrap_or(0.02) as f32;
    let pending = PendingDir::new(dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cpu = Device::Cpu;
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], rng: &mut ChaCha8Rng| -> Result<()> {
        let n = shape.iter().product();
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, candle_core::DType::F32, &cpu)?
        } else {
            Tensor::from_vec(normal(rng, n, std), shape, &cpu)?
        };
        tensors.push((name, t));
        Ok(())
    };
    add("model.embed_tokens.weight".into(), &[v, h], &mut rng)?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (module, block) in [
            ("qkv_proj", "self_attn"),
            ("o_proj", "self_attn"),
            ("gate_up_proj", "mlp"),
            ("down_proj", "mlp"),
        ] {
            let (out, inp) = cfg.linear_shape(module).expect("known module");
            add(format!("{p}{block}.{module}.weight"), &[out, inp], &mut rng)?;
        }
        add(format!("{p}input_layernorm.weight"), &[h], &mut rng)?;
        add(
            format!("{p}post_attention_layernorm.weight"),
            &[h],
            &mut rng,
        )?;
    }
    add("model.norm.weight".into(), &[h], &mut rng)?;
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), &[v, h], &mut rng)?;
    }
    write_safetensors(&pending.tmp.join("model.safetensors"), &tensors)?;
    let write = |name: &str, value: &Value| -> Result<()> {
        let p = pending.tmp.join(name);
        let text = serde_json::to_string_pretty(value).expect("a JSON value") + "\n";
        std::fs::write(&p, text).at(&p)
    };
    write("config.json", &cfg_json)?;
    let eos = if v > 32007 {
        json!([32000, 32001, 32007])
    } else {
        cfg_json["eos_token_id"].clone()
    };
    write(
        "generation_config.json",
        &json!({
            "bos_token_id": cfg_json["bos_token_id"],
            "eos_token_id": eos,
            "pad_token_id": cfg_json["pad_token_id"],
        }),
    )?;
    if let Some(tok) = tokenizer {
        let mut copied = 0;
        for name in SIDE_FILES
            .iter()
            .filter(|n| !n.contains("config.json") || n.starts_with("tokenizer"))
        {
            let from = tok.join(name);
            if from.is_file() {
                let to = pending.tmp.join(name);
                std::fs::copy(&from, &to).at(&to)?;
                copied += 1;
            }
        }
        if copied == 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: no tokenizer files here (tokenizer.json, tokenizer_config.json, ...)",
                tok.display()
            )));
        }
    }
    pending.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_loadable_folder_with_the_overrides() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let over = json!({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100});
        create_random_model(&dir, &over, 1, None).unwrap();
        let cfg = super::super::weights::read_config(&dir).unwrap();
        assert_eq!(
            (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size),
            (32, 2, 100)
        );
        let m =
            super::super::Phi3::load_frozen(&dir, std::sync::Arc::new(crate::kernels::cpu::Cpu))
                .unwrap();
        let b = m.batch(&[1, 2, 3], None, &[3]).unwrap();
        let logits = m.logits(&b).unwrap();
        assert_eq!(logits.len(), 3 * 100);
        // same seed, same weights; the std is initializer_range
        let again = tmp.path().join("again");
        create_random_model(&again, &over, 1, None).unwrap();
        let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(read(&dir), read(&again));
        let w =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let e: Vec<f32> = w["model.embed_tokens.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let var = e.iter().map(|x| x * x).sum::<f32>() / e.len() as f32;
        assert!((var.sqrt() - 0.02).abs() < 0.002, "{}", var.sqrt());
        assert!(create_random_model(
            &dir,
            &json!({"hidden_size": 30, "num_attention_heads": 4}),
            1,
            None
        )
        .is_err());
    }
}
