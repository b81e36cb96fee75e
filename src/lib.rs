//! ferrotune core.
pub mod chat;
pub mod data;
pub mod error;
pub mod hub;
pub mod progress;

#[cfg(feature = "python")]
mod python;
