//! Training: configuration, data, AdamW, schedules, the loop, checkpoints, and the
//! data-parallel group.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distributed;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use config::TrainConfig;
pub use distributed::WorldSpec;
pub use trainer::{finetune, Summary};
