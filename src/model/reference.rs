//! Test oracle: the same Phi-3 + LoRA written with candle's differentiable ops (no fused
//! kernel, no hand-written backward), differentiated by candle's autograd. The CPU path's
//! loss and adapter gradients are checked against it in `phi3::tests`; transformers + peft
//! remain the reference users compare with (`tests/test_model_parity.py`).

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var, D};

use super::{Batch, Phi3};

/// `n` values uniform in [-1, 1) from `seed`.
pub(crate) fn randn(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn t(b: &crate::kernels::Buf, shape: &[usize]) -> Tensor {
    Tensor::from_vec(b.f32s().unwrap().to_vec(), shape, &Device::Cpu).unwrap()
}

/// `(Σ CE, d (scale · Σ CE) / d adapter tensor by PEFT name)` for a batch without dropout.
pub(crate) fn loss_and_grads(m: &Phi3, b: &Batch, scale: f64) -> (f64, HashMap<String, Vec<f32>>) {
    let cfg = &m.cfg;
    let (hd, n) = (cfg.hidden_size, b.n_tokens());
    let (hq, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let eps = cfg.rms_norm_eps as f32;
    let dev = Device::Cpu;
    let values = m.lora_values().unwrap();
    let vars: HashMap<String, Var> = m
        .lora_layout()
        .into_iter()
        .map(|(name, shape, off)| {
            let k: usize = shape.iter().product();
            let v = Tensor::from_vec(values[off..off + k].to_vec(), shape, &dev).unwrap();
            (name, Var::from_tensor(&v).unwrap())
        })
        .collect();
    // RoPE tables from the positions (each segment restarts at 0)
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    let mscale = cfg.attention_factor() as f32;
    for &(_, len) in &b.lay.segments {
        let long = cfg
            .longrope
            .as_ref()
            .is_some_and(|l| len > l.original_max_position_embeddings);
        for p in 0..len {
            for &f in &m.inv_freq[usize::from(long)] {
                let a = f * p as f32;
                cos.push(a.cos() * mscale);
                sin.push(a.sin() * mscale);
            }
        }
    }
    let cos = Tensor::from_vec(cos, (n, d / 2), &dev).unwrap();
    let sin = Tensor::from_vec(sin, (n, d / 2), &dev).unwrap();
    let window = cfg.sliding_window.unwrap_or(usize::MAX);
    let ids: Vec<u32> = b.ids.i32s().unwrap().iter().map(|&i| i as u32).collect();
    let ids = Tensor::new(ids.as_slice(), &dev).unwrap();
    let proj = |x: &Tensor, lin: &super::Lin, l: usize, module: &str| -> Tensor {
        let w = t(&lin.w, &[lin.out, lin.inp]);
        let mut y = x.matmul(&w.t().unwrap()).unwrap();
        if lin.lora.is_some() {
            let a = &vars[&super::peft_key(l, module, "A")];
            let bb = &vars[&super::peft_key(l, module, "B")];
            let s = m.lora_cfg.scale();
            let u = x.matmul(&a.as_tensor().t().unwrap()).unwrap();
            y = (y + (u.matmul(&bb.as_tensor().t().unwrap()).unwrap() * s).unwrap()).unwrap();
        }
        y
    };
    let mut x = t(&m.embed, &[cfg.vocab_size, hd])
        .index_select(&ids, 0)
        .unwrap();
    for (l, layer) in m.layers.iter().enumerate() {
        let h = candle_nn::ops::rms_norm_slow(&x, &t(&layer.input_norm, &[hd]), eps).unwrap();
        let qkv = proj(&h, &layer.qkv, l, "qkv_proj");
        let heads = |start: usize, count: usize| -> Tensor {
            qkv.narrow(1, start * d, count * d)
                .unwrap()
                .reshape((n, count, d))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let rope = |x: Tensor| -> Tensor {
            candle_nn::rotary_emb::rope_slow(&x.unsqueeze(0).unwrap(), &cos, &sin)
                .unwrap()
                .squeeze(0)
                .unwrap()
        };
        let (q, k, v) = (
            rope(heads(0, hq)),
            rope(heads(hq, hkv)),
            heads(hq + hkv, hkv),
        );
        let rep = hq / hkv;
        let expand = |t: &Tensor, len: usize| -> Tensor {
            t.unsqueeze(1)
                .unwrap()
                .expand((hkv, rep, len, d))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((hq, len, d))
                .unwrap()
        };
        let mut outs = vec![];
        for &(s, len) in &b.lay.segments {
            let ks = expand(&k.narrow(1, s, len).unwrap(), len);
            let vs = expand(&v.narrow(1, s, len).unwrap(), len);
            let mask: Vec<f32> = (0..len * len)
                .map(|i| {
                    let (qp, kp) = (i / len, i % len);
                    if kp <= qp && qp - kp < window {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (len, len), &dev).unwrap();
            let sc = (q
                .narrow(1, s, len)
                .unwrap()
                .matmul(&ks.t().unwrap())
                .unwrap()
                * (1.0 / (d as f64).sqrt()))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
            let p = candle_nn::ops::softmax(&sc, D::Minus1).unwrap();
            outs.push(p.matmul(&vs).unwrap());
        }
        let attn = Tensor::cat(&outs, 1)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((n, hq * d))
            .unwrap();
        let x1 = (&x + proj(&attn, &layer.o, l, "o_proj")).unwrap();
        let h2 = candle_nn::ops::rms_norm_slow(&x1, &t(&layer.post_norm, &[hd]), eps).unwrap();
        let gu = proj(&h2, &layer.gate_up, l, "gate_up_proj");
        let i = layer.gate_up.out / 2;
        let act =
            (gu.narrow(1, 0, i).unwrap().silu().unwrap() * gu.narrow(1, i, i).unwrap()).unwrap();
        x = (&x1 + proj(&act, &layer.down, l, "down_proj")).unwrap();
    }
    let hn = candle_nn::ops::rms_norm_slow(&x, &t(&m.norm, &[hd]), eps).unwrap();
    let pos: Vec<u32> = b
        .target_pos
        .as_ref()
        .unwrap()
        .i32s()
        .unwrap()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let tgt: Vec<u32> = b
        .targets
        .as_ref()
        .unwrap()
        .i32s()
        .unwrap()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let rows = hn
        .index_select(&Tensor::new(pos.as_slice(), &dev).unwrap(), 0)
        .unwrap();
    let logits = rows
        .matmul(&t(m.lm_head(), &[cfg.vocab_size, hd]).t().unwrap())
        .unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let tg = Tensor::new(tgt.as_slice(), &dev)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let ce = (lsm.gather(&tg, 1).unwrap().sum_all().unwrap() * -1.0).unwrap();
    let raw = ce.to_scalar::<f32>().unwrap() as f64;
    let store = (ce * scale).unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|(name, v)| {
            let g = store.get(v.as_tensor()).unwrap();
            (
                name.clone(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    (raw, grads)
}
