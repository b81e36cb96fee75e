//! ferrotune core.
pub mod error;
pub mod data;
pub mod hub;
pub mod progress;

#[cfg(feature = "python")]
mod python;
