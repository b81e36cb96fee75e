//! Choosing the next token from logits, as `transformers`' `generate` does: repetition
//! penalty, then (when sampling) temperature, top-k and top-p, then a draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Generation settings (the names and defaults of `transformers.GenerationConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateParams {
    /// At most this many new tokens per conversation.
    pub max_new_tokens: usize,
    /// Sample from the distribution; `false` is greedy (argmax).
    pub do_sample: bool,
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// > 1 discourages tokens already in the prompt or the output (CTRL's penalty).
    pub repetition_penalty: f64,
    /// Seed for sampling; each conversation draws from its own stream, so a conversation's
    /// output does not depend on what else is in the batch. `None`: a random seed.
    pub seed: Option<u64>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 50,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl GenerateParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        // Like transformers, temperature and top_p only matter (and are only checked)
        // when sampling.
        if self.do_sample && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature must be a positive number when sampling, got {} (for greedy decoding use do_sample=false)",
                self.temperature
            ));
        }
        if self.do_sample && !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Picks next tokens for one conversation: holds its random stream and the set of ids
/// the repetition penalty applies to.
pub struct Sampler {
    rng: ChaCha8Rng,
    /// `seen[id]`: the id occurs in the prompt or the output so far.
    seen: Vec<bool>,
}

impl Sampler {
    /// `stream` separates conversations drawing from the same `seed`.
    pub fn new(seed: u64, stream: u64, prompt: &[u32], vocab: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let mut seen = vec![false; vocab];
        for &t in prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Self { rng, seen }
    }

    /// The next token from `logits` (one row, f32, modified in place).
    pub fn next(&mut self, logits: &mut [f32], p: &GenerateParams) -> u32 {
        if p.repetition_penalty != 1.0 {
            repetition_penalty(logits, &self.seen, p.repetition_penalty as f32);
        }
        let t = if p.do_sample {
            if p.temperature != 1.0 {
                let inv = p.temperature as f32;
                logits.iter_mut().for_each(|v| *v /= inv);
            }
            if p.top_k > 0 {
                top_k(logits, p.top_k);
            }
            if p.top_p < 1.0 {
                top_p(logits, p.top_p);
            }
            draw(logits, self.rng.random::<f64>())
        } else {
            argmax(logits)
        };
        if let Some(s) = self.seen.get_mut(t as usize) {
            *s = true;
        }
        t
    }
}

/// The first index of the largest value (torch.argmax's choice among ties); NaN never wins.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best as u32
}

/// CTRL's penalty as transformers applies it: a seen token's logit is divided by
/// `penalty` when positive and multiplied by it when negative.
pub fn repetition_penalty(logits: &mut [f32], seen: &[bool], penalty: f32) {
    for (x, &s) in logits.iter_mut().zip(seen) {
        if s {
            *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
        }
    }
}

/// Keeps the `k` largest logits (and any tied with the k-th), the rest become -inf.
pub fn top_k(logits: &mut [f32], k: usize) {
    if k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for x in logits.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus filtering as transformers' `TopPLogitsWarper`: sort ascending, drop tokens
/// whose cumulative probability stays at or below `1 - top_p`, always keep the likeliest.
pub fn top_p(logits: &mut [f32], p: f64) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let probs = softmax(&order.iter().map(|&i| logits[i]).collect::<Vec<_>>());
    let mut cum = 0.0f64;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[rank];
        if cum <= 1.0 - p && rank != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f64 (exact enough for cumulative sums over 32k entries).
fn softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return vec![1.0 / v.len() as f64; v.len()];
    }
    let e: Vec<f64> = v.iter().map(|&x| (x as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Inverse-CDF draw from softmax(`logits`) with `u` in [0, 1).
fn draw(logits: &[f32], u: f64) -> u32 {
    let probs = softmax(logits);
    let mut cum = 0.0;
    let mut last_possible = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            last_possible = i;
            cum += p;
            if u < cum {
                return i as u32;
            }
        }
    }
    last_possible as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }

    #[test]
    fn penalty_divides_positive_and_multiplies_negative() {
        let mut l = [2.0, -2.0, 2.0];
        repetition_penalty(&mut l, &[true, true, false], 2.0);
        assert_eq!(l, [1.0, -4.0, 2.0]);
    }

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let mut l = [1.0, 5.0, 3.0, 3.0, 0.0];
        top_k(&mut l, 2);
        assert_eq!(l[1], 5.0);
        assert_eq!((l[2], l[3]), (3.0, 3.0));
        assert!(l[0].is_infinite() && l[4].is_infinite());
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities ~ 0.64, 0.24, 0.09, 0.03
        let mut l = [3.0f32, 2.0, 1.0, 0.0];
        top_p(&mut l, 0.8);
        assert_eq!(&l[..2], &[3.0, 2.0]);
        assert!(l[2].is_infinite() && l[3].is_infinite());
        let mut one = [0.0f32, 10.0];
        top_p(&mut one, 0.01);
        assert_eq!(one[1], 10.0);
        assert!(one[0].is_infinite());
    }

    #[test]
    fn sampling_is_reproducible_and_follows_the_distribution() {
        let p = GenerateParams {
            do_sample: true,
            top_k: 0,
            seed: Some(7),
            ..Default::default()
        };
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let run = |stream| {
            let mut s = Sampler::new(7, stream, &[], 3);
            (0..4000)
                .map(|_| s.next(&mut logits.clone(), &p))
                .collect::<Vec<_>>()
        };
        let a = run(0);
        assert_eq!(a, run(0));
        assert_ne!(a, run(1));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        assert!(!a.contains(&2));
    }

    #[test]
    fn params_are_checked() {
        let ok = GenerateParams::default();
        assert!(ok.validate().is_ok());
        // greedy ignores the sampling knobs, as transformers does
        let greedy = GenerateParams {
            temperature: 0.0,
            ..ok.clone()
        };
        assert!(greedy.validate().is_ok());
        for bad in [
            GenerateParams {
                max_new_tokens: 0,
                ..ok.clone()
            },
            GenerateParams {
                temperature: 0.0,
                do_sample: true,
                ..ok.clone()
            },
            GenerateParams {
                top_p: 1.5,
                do_sample: true,
                ..ok.clone()
            },
            GenerateParams {
                repetition_penalty: -1.0,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
