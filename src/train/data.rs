//! Training data: conversations are tokenized (and packed) with the model's own tokenizer
//! unless the file is already a ferrotune tokenized file; micro-batches are groups of rows.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{Strategy, TrainConfig};
use crate::chat::{self, ChatTokenizer, TokenizedRows};
use crate::error::{Error, Result};
use crate::progress::Ctx;

/// Train rows and (when evaluating) validation rows.
pub struct Data {
    pub train: TokenizedRows,
    pub validation: Option<TokenizedRows>,
    pub train_path: PathBuf,
}

/// A file ferrotune tokenized (Arrow IPC, or Parquet with an `input_ids` column)?
fn read_tokenized(path: &Path) -> Result<Option<TokenizedRows>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "parquet" && ext != "arrow" {
        return Ok(None);
    }
    match TokenizedRows::read(path) {
        Ok(rows) => Ok(Some(rows)),
        // A Parquet file of conversations: tokenize it.
        Err(Error::DataFormat { message, .. })
            if ext == "parquet" && message.contains("\"input_ids\"") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Reads or tokenizes the train (and validation) data; tokenized files go to `out`.
pub fn prepare(cfg: &TrainConfig, out: &Path, ctx: &Ctx) -> Result<Data> {
    let evaluate = cfg.evaluation_strategy != Strategy::No;
    let mut tokenizer: Option<ChatTokenizer> = None;
    let mut tokenize = |src: &Path,
                        dest: &str,
                        records: Option<std::ops::Range<u64>>|
     -> Result<(TokenizedRows, PathBuf)> {
        if tokenizer.is_none() {
            tokenizer = Some(ChatTokenizer::load(
                &cfg.model,
                "main",
                cfg.token.clone(),
                ctx,
            )?);
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let dest = out.join(dest);
        let opts = chat::TokenizeOptions {
            data_files: vec![src.to_path_buf()],
            output: dest.clone(),
            max_seq_length: (cfg.max_seq_length > 0).then_some(cfg.max_seq_length as usize),
            mode: if cfg.packing {
                chat::PackMode::Pack
            } else {
                chat::PackMode::Pad
            },
            train_on: chat::TrainOn::Assistant,
            strict: false,
            num_threads: None,
            pack_window: chat::DEFAULT_PACK_WINDOW,
            records,
        };
        let stats = chat::tokenize_dataset(tokenizer.as_ref().expect("set above"), &opts, ctx)?;
        let dropped: u64 = stats.dropped.values().sum();
        ctx.message(&format!(
            "{}: {} conversations kept, {dropped} dropped, {} tokens ({} trained) in {} rows",
            src.display(),
            stats.rows_out,
            stats.total_tokens,
            stats.trainable_tokens,
            stats.rows_written
        ));
        Ok((TokenizedRows::read(&dest)?, dest))
    };
    let (train, train_path, validation) = match read_tokenized(&cfg.train_file)? {
        Some(rows) => {
            if evaluate && cfg.validation_file.is_none() {
                // Already packed: split whole rows (the last share of rows).
                let n = rows.num_rows();
                let n_val = ((n as f64 * cfg.validation_split).round() as usize)
                    .clamp(1, n.saturating_sub(1).max(1));
                let (t, v) = split_rows(&rows, n - n_val.min(n));
                (t, cfg.train_file.clone(), Some(v))
            } else {
                (rows, cfg.train_file.clone(), None)
            }
        }
        None => {
            if evaluate && cfg.validation_file.is_none() {
                // As the Azure ML pipeline: the last `validation_split` of the train
                // conversations, in file order.
                let n = chat::count_records(std::slice::from_ref(&cfg.train_file))?;
                let n_val = ((n as f64 * cfg.validation_split).round() as u64)
                    .clamp(1, n.saturating_sub(1).max(1));
                let cut = n - n_val.min(n);
                let (t, tp) = tokenize(&cfg.train_file, "train.parquet", Some(0..cut))?;
                let (v, _) = tokenize(&cfg.train_file, "validation.parquet", Some(cut..n))?;
                (t, tp, Some(v))
            } else {
                let (t, tp) = tokenize(&cfg.train_file, "train.parquet", None)?;
                (t, tp, None)
            }
        }
    };
    let validation = match (&cfg.validation_file, validation) {
        (Some(v), _) if evaluate => Some(match read_tokenized(v)? {
            Some(rows) => rows,
            None => tokenize(v, "validation.parquet", None)?.0,
        }),
        (_, v) => v,
    };
    if train.num_rows() == 0 || !train.labels.iter().any(|&l| l != -100) {
        return Err(Error::Training(format!(
            "{}: no trainable tokens (every conversation was dropped or has no assistant turn to learn from)",
            cfg.train_file.display()
        )));
    }
    Ok(Data {
        train,
        validation,
        train_path,
    })
}

/// Rows `[0, cut)` and `[cut, n)` of `rows`.
fn split_rows(rows: &TokenizedRows, cut: usize) -> (TokenizedRows, TokenizedRows) {
    let part = |from: usize, to: usize| -> TokenizedRows {
        let (t0, t1) = (
            rows.row_offsets[from] as usize,
            rows.row_offsets[to] as usize,
        );
        let (s0, s1) = (
            rows.seq_offsets[from] as usize,
            rows.seq_offsets[to] as usize,
        );
        TokenizedRows {
            input_ids: rows.input_ids[t0..t1].to_vec(),
            labels: rows.labels[t0..t1].to_vec(),
            position_ids: rows.position_ids[t0..t1].to_vec(),
            row_offsets: rows.row_offsets[from..=to]
                .iter()
                .map(|o| o - t0 as i64)
                .collect(),
            seq_lengths: rows.seq_lengths[s0..s1].to_vec(),
            seq_offsets: rows.seq_offsets[from..=to]
                .iter()
                .map(|o| o - s0 as i64)
                .collect(),
            description: rows.description.clone(),
        }
    };
    (part(0, cut), part(cut, rows.num_rows()))
}

/// A micro-batch as flat arrays.
pub struct Flat {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub seq_lengths: Vec<usize>,
}

/// Concatenates rows `idx` of `rows`.
pub fn gather(rows: &TokenizedRows, idx: &[usize]) -> Flat {
    let mut f = Flat {
        ids: Vec::new(),
        labels: Vec::new(),
        seq_lengths: Vec::new(),
    };
    for &r in idx {
        let (a, b) = (
            rows.row_offsets[r] as usize,
            rows.row_offsets[r + 1] as usize,
        );
        f.ids.extend(rows.input_ids[a..b].iter().map(|&t| t as u32));
        f.labels.extend_from_slice(&rows.labels[a..b]);
        let (s, e) = (
            rows.seq_offsets[r] as usize,
            rows.seq_offsets[r + 1] as usize,
        );
        f.seq_lengths
            .extend(rows.seq_lengths[s..e].iter().map(|&l| l as usize));
    }
    f
}

/// The row order of `epoch`: shuffled from the seed (same on every run and on resume),
/// or file order.
pub fn epoch_order(n: usize, epoch: usize, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(
            seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED,
        );
        order.shuffle(&mut rng);
    }
    order
}
