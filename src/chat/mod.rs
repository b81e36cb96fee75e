//! Chat data → training rows: tokenizer loading (folder, Hub repo, Azure ML MLflow folder),
//! the Hugging Face-compatible chat template environment, encoding with assistant-only
//! labels computed from the rendered text's offsets, truncation, packing, and the
//! `tokenize_dataset` pipeline that reads JSONL/Parquet and writes Parquet/Arrow rows.
//!
//! The reference for every token id is `transformers` 5.24.0's
//! `AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True)`.

pub mod compat;
pub mod conversation;
pub mod dataset;
pub mod files;
pub mod input;
pub mod output;
pub mod pack;
pub mod template;
pub mod tokenizer;
pub mod word_split;

pub use conversation::{DropReason, Message};
pub use dataset::{
    count_records, tokenize_dataset, PackMode, TokenizeOptions, TokenizeStats, DEFAULT_PACK_WINDOW,
};
pub use output::TokenizedRows;
pub use tokenizer::{ChatTokenizer, EncodedChat, TrainOn};
