//! `tokenize_dataset`: conversations from JSONL/Parquet files → packed (or one-per-row)
//! training rows in a Parquet/Arrow file, with statistics.
//!
//! Three threads of work: a reader hands out chunks of rows in file order; the rayon pool
//! parses, checks, renders and tokenizes each chunk in parallel (collected back in input
//! order, so the output does not depend on the thread count); a writer encodes and writes
//! the rows. Packing works on windows of `pack_window` kept conversations, which bounds
//! memory (a window of 8192 Phi-3 conversations is ~100 MB of tokens) at a packing
//! efficiency within a fraction of a percent of packing the whole dataset at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

use rayon::prelude::*;
use serde_json::json;

use super::conversation::DropReason;
use super::input::{parse_json_line, PendingRow, RowReader};
use super::output::RowWriter;
use super::pack::{pack_rows, single_rows};
use super::tokenizer::{ChatError, ChatTokenizer, EncodedChat, TrainOn};
use crate::error::{Error, Result};
use crate::progress::Ctx;

/// How conversations become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackMode {
    /// Best-fit-decreasing packing of whole conversations into rows of `max_seq_length`.
    Pack,
    /// One conversation per row (padded per batch at training time).
    Pad,
}

impl PackMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pack" | "packed" => Ok(Self::Pack),
            "pad" | "padded" => Ok(Self::Pad),
            _ => Err(Error::InvalidArgument(format!(
                "mode must be 'pack' or 'pad', not {s:?}"
            ))),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Pack => "pack",
            Self::Pad => "pad",
        }
    }
}

/// What to tokenize and how.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    pub data_files: Vec<PathBuf>,
    pub output: PathBuf,
    /// Right truncation length and packed row capacity; default
    /// `min(model_max_length, max_position_embeddings)`.
    pub max_seq_length: Option<usize>,
    pub mode: PackMode,
    pub train_on: TrainOn,
    /// A dropped row is an error instead of a count.
    pub strict: bool,
    /// Threads for tokenization (default: all cores).
    pub num_threads: Option<usize>,
    /// Conversations packed together at a time.
    pub pack_window: usize,
    /// Only these records (0-based, counted across all files, blank lines not counted):
    /// how training splits off its validation conversations.
    pub records: Option<std::ops::Range<u64>>,
}

/// The number of records (non-blank JSON lines, Parquet rows) in `files`.
pub fn count_records(files: &[PathBuf]) -> Result<u64> {
    let mut n = 0;
    for f in files {
        let mut r = RowReader::open(f)?;
        if let Some(t) = r.total_rows() {
            n += t;
            continue;
        }
        loop {
            let c = r.next_chunk(CHUNK_ROWS)?;
            if c.is_empty() {
                break;
            }
            n += c.len() as u64;
        }
    }
    Ok(n)
}

/// Default `pack_window`.
pub const DEFAULT_PACK_WINDOW: usize = 8192;
/// Rows handed to the pool at a time.
const CHUNK_ROWS: usize = 1024;
/// Rows per written batch.
const WRITE_ROWS: usize = 1024;

/// What happened, in numbers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizeStats {
    pub rows_in: u64,
    /// Conversations kept.
    pub rows_out: u64,
    /// Rows in the output file.
    pub rows_written: u64,
    /// Dropped rows by reason (every reason present, zeros included).
    pub dropped: BTreeMap<&'static str, u64>,
    /// Kept conversations that were cut to `max_seq_length`.
    pub truncated: u64,
    pub total_tokens: u64,
    pub trainable_tokens: u64,
    /// Real tokens / (rows × max_seq_length): the share of token slots that hold data if
    /// every row were padded to `max_seq_length`.
    pub packing_efficiency: f64,
    /// Conversation lengths (after truncation) in power-of-two buckets, e.g. "129-256".
    pub length_histogram: Vec<(String, u64)>,
    pub max_seq_length: usize,
    pub output: PathBuf,
}

fn bucket(len: usize) -> usize {
    // 1..=128 → 0, 129..=256 → 1, ...
    let bits = usize::BITS - (len.max(1) - 1).leading_zeros();
    (bits as usize).saturating_sub(7)
}

fn bucket_name(b: usize) -> String {
    let hi = 128usize << b;
    let lo = if b == 0 { 1 } else { hi / 2 + 1 };
    format!("{lo}-{hi}")
}

enum Outcome {
    Kept(EncodedChat),
    Dropped(DropReason, String),
}

/// Tokenizes, packs and writes. See the module docs.
pub fn tokenize_dataset(
    tok: &ChatTokenizer,
    opts: &TokenizeOptions,
    ctx: &Ctx,
) -> Result<TokenizeStats> {
    if opts.data_files.is_empty() {
        return Err(Error::InvalidArgument("no data files given".into()));
    }
    let max_len = match opts.max_seq_length.or(tok.default_max_seq_length()) {
        Some(0) => return Err(Error::InvalidArgument("max_seq_length must be at least 1".into())),
        Some(n) => n,
        None => {
            return Err(Error::InvalidArgument(
                "max_seq_length is not set and the tokenizer has no model_max_length; pass max_seq_length".into(),
            ))
        }
    };
    if opts.pack_window == 0 {
        return Err(Error::InvalidArgument(
            "pack_window must be at least 1".into(),
        ));
    }
    // Open every input first: a missing or malformed file fails before anything is written.
    let mut readers = opts
        .data_files
        .iter()
        .map(|p| RowReader::open(p))
        .collect::<Result<Vec<_>>>()?;
    let total: Option<u64> = readers.iter().map(RowReader::total_rows).sum();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.num_threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start worker threads: {e}")))?;
    let description = json!({
        "tokenizer": tok.origin,
        "mode": opts.mode.name(),
        "max_seq_length": max_len,
        "train_on": match opts.train_on { TrainOn::Assistant => "assistant", TrainOn::All => "all" },
        "data_files": opts.data_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "ferrotune_version": env!("CARGO_PKG_VERSION"),
    });
    let writer = RowWriter::create(&opts.output, &description)?;

    let mut stats = TokenizeStats {
        max_seq_length: max_len,
        dropped: DropReason::ALL.iter().map(|r| (r.key(), 0)).collect(),
        ..Default::default()
    };
    let mut histogram: BTreeMap<usize, u64> = BTreeMap::new();
    let task = ctx.task("tokenize", total, "rows");

    std::thread::scope(|s| -> Result<()> {
        let (chunk_tx, chunk_rx) = sync_channel::<Result<(usize, Vec<PendingRow>)>>(2);
        let (row_tx, row_rx) = sync_channel::<WriterMsg>(1);
        let cancel = ctx.cancel().clone();
        let records = opts.records.clone();
        s.spawn(move || {
            let mut seen = 0u64;
            for (i, r) in readers.iter_mut().enumerate() {
                loop {
                    if cancel.is_cancelled() {
                        return;
                    }
                    if records.as_ref().is_some_and(|r| seen >= r.end) {
                        return;
                    }
                    match r.next_chunk(CHUNK_ROWS) {
                        Ok(c) if c.is_empty() => break,
                        Ok(c) => {
                            let first = seen;
                            seen += c.len() as u64;
                            let c: Vec<PendingRow> = match &records {
                                None => c,
                                Some(range) => c
                                    .into_iter()
                                    .enumerate()
                                    .filter(|(k, _)| range.contains(&(first + *k as u64)))
                                    .map(|(_, row)| row)
                                    .collect(),
                            };
                            if c.is_empty() {
                                continue;
                            }
                            if chunk_tx.send(Ok((i, c))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = chunk_tx.send(Err(e));
                            return;
                        }
                    }
                }
            }
        });
        let (mode, capacity) = (opts.mode, max_len);
        let written = s.spawn(move || write_rows(writer, row_rx, mode, capacity));

        let mut window: Vec<EncodedChat> = Vec::new();
        // The writer thread packs and writes a window while the pool tokenizes the next.
        let flush = |window: &mut Vec<EncodedChat>| {
            let w = std::mem::take(window);
            // A send fails only when the writer stopped on an error, reported below.
            let _ = row_tx.send(WriterMsg::Window(w));
        };
        let run = (|| -> Result<()> {
            for msg in chunk_rx.iter() {
                ctx.check()?;
                let (file_idx, chunk) = msg?;
                let path = &opts.data_files[file_idx];
                let n = chunk.len() as u64;
                let outcomes: Vec<(String, Result<Outcome>)> = pool.install(|| {
                    chunk
                        .into_par_iter()
                        .map(|row| {
                            (
                                row.position(),
                                process(tok, path, row, opts.train_on, max_len),
                            )
                        })
                        .collect()
                });
                for (position, outcome) in outcomes {
                    stats.rows_in += 1;
                    match outcome? {
                        Outcome::Kept(c) => {
                            let len = c.input_ids.len();
                            stats.rows_out += 1;
                            stats.truncated += u64::from(c.truncated);
                            stats.total_tokens += len as u64;
                            stats.trainable_tokens += c.trainable() as u64;
                            *histogram.entry(bucket(len)).or_default() += 1;
                            window.push(c);
                        }
                        Outcome::Dropped(reason, detail) if opts.strict => {
                            return Err(Error::Conversation {
                                path: path.display().to_string(),
                                position,
                                reason: reason.key(),
                                detail: if detail.is_empty() {
                                    reason.describe().to_string()
                                } else {
                                    detail
                                },
                            });
                        }
                        Outcome::Dropped(reason, _) => {
                            *stats.dropped.entry(reason.key()).or_default() += 1;
                        }
                    }
                }
                task.advance(n);
                if opts.mode == PackMode::Pad || window.len() >= opts.pack_window {
                    flush(&mut window);
                }
            }
            flush(&mut window);
            ctx.check()
        })();
        let ok = run.is_ok();
        if ok {
            let _ = row_tx.send(WriterMsg::Finish);
        }
        drop(row_tx);
        drop(chunk_rx);
        let write_result = written.join().expect("the writer thread does not panic");
        run?;
        write_result.map(|(path, rows)| {
            stats.output = path;
            stats.rows_written = rows;
        })
    })?;
    drop(task);

    let slots = stats.rows_written * max_len as u64;
    stats.packing_efficiency = if slots == 0 {
        0.0
    } else {
        stats.total_tokens as f64 / slots as f64
    };
    stats.length_histogram = histogram
        .into_iter()
        .map(|(b, n)| (bucket_name(b), n))
        .collect();
    Ok(stats)
}

enum WriterMsg {
    /// Kept conversations to pack (or lay out one per row) and write.
    Window(Vec<EncodedChat>),
    /// Everything was sent: close and rename into place. Without it the file is discarded.
    Finish,
}

/// The writer thread: returns the final path and the number of rows written.
fn write_rows(
    mut writer: RowWriter,
    rx: Receiver<WriterMsg>,
    mode: PackMode,
    capacity: usize,
) -> Result<(PathBuf, u64)> {
    let mut written = 0u64;
    for msg in rx.iter() {
        match msg {
            WriterMsg::Window(convs) => {
                let rows = match mode {
                    PackMode::Pack => pack_rows(&convs, capacity),
                    PackMode::Pad => single_rows(&convs),
                };
                drop(convs);
                for batch in rows.chunks(WRITE_ROWS) {
                    writer.write(batch)?;
                }
                written += rows.len() as u64;
            }
            WriterMsg::Finish => return Ok((writer.finish()?, written)),
        }
    }
    Err(Error::Cancelled)
}

fn process(
    tok: &ChatTokenizer,
    path: &Path,
    row: PendingRow,
    train_on: TrainOn,
    max_len: usize,
) -> Result<Outcome> {
    let conv = match row {
        PendingRow::Json { line, text } => parse_json_line(path, line, &text)?,
        PendingRow::Decoded { conv, .. } => conv,
    };
    match tok.encode_checked(
        &conv.messages,
        conv.non_string_content,
        train_on,
        Some(max_len),
    ) {
        Ok(c) => Ok(Outcome::Kept(c)),
        Err(ChatError::Drop(reason, detail)) => Ok(Outcome::Dropped(reason, detail)),
        Err(ChatError::Fatal(e)) => Err(e),
    }
}
