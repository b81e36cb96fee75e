//! LoRA dropout masks from a counter-based hash.
//!
//! Element `i` of a projection's input is kept or dropped by a function of (key, i) alone,
//! the key mixing the run's seed, the micro-batch, the layer and the module. So the mask
//! needs no random stream and no storage: the CPU and the GPU kernel (`dropout.cu`, the same
//! arithmetic) draw the same mask, a recomputed forward or the backward draws it again, and
//! nothing crosses the bus (a host-drawn mask was ~557k floats per token for Phi-3-mini).

/// The splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) for element `i` under `key`, with 24 random bits (exact in f32).
pub fn uniform(key: u64, i: u64) -> f32 {
    let z = mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Whether element `i` survives dropout with probability `p` under `key`.
pub fn keep(key: u64, i: u64, p: f32) -> bool {
    uniform(key, i) >= p
}

/// The key of one projection's mask in one micro-batch: `seed` is the micro-batch's
/// dropout seed, `layer` and `module` (0..4: qkv, o, gate_up, down) pick the projection.
pub fn key(seed: u64, layer: usize, module: usize) -> u64 {
    mix(seed ^ mix((layer as u64) << 8 | module as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_asked_fraction_and_depends_on_every_input() {
        let p = 0.3;
        let n = 200_000u64;
        let dropped = (0..n).filter(|&i| !keep(42, i, p)).count() as f64 / n as f64;
        assert!((dropped - 0.3).abs() < 0.005, "{dropped}");
        let masks = |k: u64| -> Vec<bool> { (0..64).map(|i| keep(k, i, 0.5)).collect() };
        assert_ne!(masks(key(1, 0, 0)), masks(key(1, 0, 1)));
        assert_ne!(masks(key(1, 0, 0)), masks(key(1, 1, 0)));
        assert_ne!(masks(key(1, 0, 0)), masks(key(2, 0, 0)));
        assert_eq!(masks(key(1, 3, 2)), masks(key(1, 3, 2)));
        assert!((0..1000).all(|i| (0.0..1.0).contains(&uniform(7, i))));
    }
}
