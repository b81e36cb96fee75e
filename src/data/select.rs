//! How many rows "the first pc %" of a split is — exactly as `datasets` computes it for
//! `split="{name}[0%:{pc}%]"`: `round(pc * n / 100)` with Python's half-to-even rounding.

use crate::error::{Error, Result};

/// A validated split percentage, in `(0, 100]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SplitPc {
    /// An integer percentage: what the original script accepts; gives its exact counts.
    Int(u32),
    /// A fractional percentage (ferrotune's extension).
    Float(f64),
}

impl SplitPc {
    /// Parses a command-line value such as `"5"` or `"2.5"`.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim().trim_end_matches('%').trim();
        if let Ok(i) = t.parse::<i64>() {
            return Self::from_f64(i as f64);
        }
        match t.parse::<f64>() {
            Ok(f) => Self::from_f64(f),
            Err(_) => Err(Error::InvalidArgument(format!(
                "split_pc must be a number between 0 (exclusive) and 100, e.g. 5; got {text:?}"
            ))),
        }
    }

    /// Validates a numeric percentage; integral values become [`SplitPc::Int`].
    pub fn from_f64(pc: f64) -> Result<Self> {
        if !pc.is_finite() || pc <= 0.0 || pc > 100.0 {
            return Err(Error::InvalidArgument(format!(
                "split_pc must be greater than 0 and at most 100 (a percentage of each split's rows); got {pc}"
            )));
        }
        if pc.fract() == 0.0 {
            Ok(SplitPc::Int(pc as u32))
        } else {
            Ok(SplitPc::Float(pc))
        }
    }

    pub fn as_f64(self) -> f64 {
        match self {
            SplitPc::Int(i) => i as f64,
            SplitPc::Float(f) => f,
        }
    }

    /// Rows kept out of `n`: Python's `round(pc * n / 100)`. For integers `pc * n` is
    /// exact (as Python's int product), then one correctly rounded division — the same
    /// float Python gets.
    pub fn rows_of(self, n: u64) -> u64 {
        let x = match self {
            SplitPc::Int(i) => (i as u64 * n) as f64 / 100.0,
            SplitPc::Float(f) => f * n as f64 / 100.0,
        };
        (x.round_ties_even() as u64).min(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ultrachat_counts_at_5_percent() {
        let pc = SplitPc::parse("5").unwrap();
        assert_eq!(pc.rows_of(207865), 10393);
        assert_eq!(pc.rows_of(23110), 1156);
        assert_eq!(pc.rows_of(256032), 12802);
        assert_eq!(pc.rows_of(28304), 1415);
    }

    #[test]
    fn half_to_even() {
        // 5 % of 10 = 0.5 → 0; 5 % of 30 = 1.5 → 2; 50 % of 5 = 2.5 → 2; 50 % of 7 = 3.5 → 4
        let five = SplitPc::Int(5);
        assert_eq!(five.rows_of(10), 0);
        assert_eq!(five.rows_of(30), 2);
        assert_eq!(SplitPc::Int(50).rows_of(5), 2);
        assert_eq!(SplitPc::Int(50).rows_of(7), 4);
        assert_eq!(SplitPc::Int(100).rows_of(7), 7);
    }

    #[test]
    fn parse_and_validate() {
        assert_eq!(SplitPc::parse("5").unwrap(), SplitPc::Int(5));
        assert_eq!(SplitPc::parse(" 7% ").unwrap(), SplitPc::Int(7));
        assert_eq!(SplitPc::parse("2.5").unwrap(), SplitPc::Float(2.5));
        assert_eq!(SplitPc::parse("5.0").unwrap(), SplitPc::Int(5));
        for bad in ["0", "-1", "101", "abc", "", "nan", "inf", "1e9"] {
            assert!(
                matches!(SplitPc::parse(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }
}
