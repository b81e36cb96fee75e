//! Training: configuration, data, AdamW, schedules, the loop, checkpoints.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{finetune, Summary};
