//! Learning-rate schedules, as `transformers.get_scheduler` defines them: a multiplier of
//! the base rate for each optimizer step (0-based; step 0 uses the multiplier at 0).

use std::f64::consts::PI;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl Schedule {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            other => Err(Error::InvalidArgument(format!(
                "lr_scheduler_type '{other}' is not supported; use linear, cosine, constant or constant_with_warmup"
            ))),
        }
    }

    /// The multiplier at optimizer step `step` of `total`, with `warmup` warm-up steps.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        let warm = || s / w.max(1.0);
        match self {
            Self::Constant => 1.0,
            Self::ConstantWithWarmup => {
                if step < warmup {
                    warm()
                } else {
                    1.0
                }
            }
            Self::Linear => {
                if step < warmup {
                    warm()
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            Self::Cosine => {
                if step < warmup {
                    warm()
                } else {
                    let progress = (s - w) / (t - w).max(1.0);
                    (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_shapes() {
        // Values of transformers' lambdas for warmup 2, total 10.
        let l = Schedule::Linear;
        assert_eq!(l.factor(0, 2, 10), 0.0);
        assert_eq!(l.factor(1, 2, 10), 0.5);
        assert_eq!(l.factor(2, 2, 10), 1.0);
        assert_eq!(l.factor(6, 2, 10), 0.5);
        assert_eq!(l.factor(10, 2, 10), 0.0);
        let c = Schedule::Cosine;
        assert!((c.factor(6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(c.factor(2, 2, 10), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(1, 4, 10), 0.25);
        assert_eq!(Schedule::Constant.factor(0, 4, 10), 1.0);
        assert!(Schedule::parse("polynomial").is_err());
    }
}
