//! Datasets: split discovery, first-N % selection, Parquet reading (local or by byte
//! ranges), and the pandas-compatible JSON Lines writer.

pub mod download_dataset;
pub mod jsonl;
pub mod parquet_source;
pub mod pending_file;
pub mod select;
pub mod splits;

pub use download_dataset::{download_dataset, DownloadOptions, OutputFormat, SplitOutput};
pub use select::SplitPc;
