//! `download-dataset.py`, in Rust: for every split of a Hub dataset, the first N % of its
//! rows in stored order, written as `{dir}/{split}.jsonl` byte-identical to what the
//! original script writes (and optionally as Parquet).
//!
//! Reading strategy, per shard: a shard already in the Hugging Face cache is read from
//! disk. Otherwise (unless `full_download`) only its footer and the row groups the prefix
//! needs are fetched with HTTP Range requests, and nothing is added to the cache. With
//! `full_download`, whole shards are downloaded into the cache first (as `datasets` does).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;

use super::jsonl;
use super::parquet_source::Shard;
use super::pending_file::PendingFile;
use super::select::SplitPc;
use super::splits::{config_patterns, front_matter, infer_splits, resolve_patterns, SplitFiles};
use crate::error::{Error, IoContext, Result};
use crate::hub::{HubClient, Repo, RepoFile};
use crate::progress::Ctx;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Jsonl,
    Parquet,
}

impl OutputFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "json" => Ok(Self::Jsonl),
            "parquet" => Ok(Self::Parquet),
            other => Err(Error::InvalidArgument(format!(
                "format must be 'jsonl', 'parquet' or both; got '{other}'"
            ))),
        }
    }
    fn ext(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Parquet => "parquet",
        }
    }
}

/// What to download.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    pub dataset: String,
    pub download_dir: PathBuf,
    pub split_pc: SplitPc,
    pub subset: Option<String>,
    /// Only these splits (default: all, like the original script).
    pub splits: Option<Vec<String>>,
    pub revision: String,
    pub formats: Vec<OutputFormat>,
    /// Download whole shards into the HF cache instead of range-reading prefixes.
    pub full_download: bool,
}

/// One written split.
#[derive(Debug, Clone)]
pub struct SplitOutput {
    pub split: String,
    /// Rows written.
    pub rows: u64,
    /// Rows in the whole split.
    pub total_rows: u64,
    pub paths: Vec<PathBuf>,
    /// Bytes fetched over the network for this split's data (0 when fully cached).
    pub bytes_fetched: u64,
}

/// Resolves the dataset's splits and their files (README YAML, else file names).
pub fn dataset_splits(
    hub: &HubClient,
    repo: &Repo,
    commit: &str,
    subset: Option<&str>,
    ctx: &Ctx,
) -> Result<Vec<SplitFiles>> {
    let files = hub.files_at(repo, commit, ctx)?;
    let card = if files.iter().any(|f| f.path == "README.md") {
        let p = hub.download(repo, commit, "README.md", ctx)?;
        let text = fs::read_to_string(&p).at(&p)?;
        front_matter(&text)?
    } else {
        None
    };
    match config_patterns(card.as_ref(), subset)? {
        Some(p) => resolve_patterns(&p, &files),
        None => infer_splits(&files),
    }
}

/// Runs the whole download. Splits are written one after another; within a split, shards
/// are opened and row groups decoded and encoded in parallel, and written in order.
pub fn download_dataset(
    hub: &HubClient,
    opts: &DownloadOptions,
    ctx: &Ctx,
) -> Result<Vec<SplitOutput>> {
    if opts.formats.is_empty() {
        return Err(Error::InvalidArgument(
            "format: ask for at least one of 'jsonl', 'parquet'".into(),
        ));
    }
    let repo = Repo::dataset(&opts.dataset)?;
    let commit = hub.resolve_revision(&repo, &opts.revision, ctx)?;
    let mut splits = dataset_splits(hub, &repo, &commit, opts.subset.as_deref(), ctx)?;
    if let Some(wanted) = &opts.splits {
        let available: Vec<String> = splits.iter().map(|s| s.name.clone()).collect();
        for w in wanted {
            if !available.contains(w) {
                return Err(Error::Dataset(format!(
                    "split '{w}' not found in {}; available: {}",
                    opts.dataset,
                    available.join(", ")
                )));
            }
        }
        splits.retain(|s| wanted.contains(&s.name));
    }
    for s in &splits {
        if let Some(f) = s
            .files
            .iter()
            .find(|f| !f.path.to_ascii_lowercase().ends_with(".parquet"))
        {
            return Err(Error::Dataset(format!(
                "split '{}' is stored as '{}'; ferrotune reads Parquet data files only",
                s.name, f.path
            )));
        }
    }
    fs::create_dir_all(&opts.download_dir).at(&opts.download_dir)?;
    let mut out = Vec::with_capacity(splits.len());
    for s in &splits {
        ctx.check()?;
        out.push(write_split(hub, &repo, &commit, s, opts, ctx)?);
    }
    Ok(out)
}

/// Opens one shard: from the cache, by full download, or remotely by its footer.
fn open_shard(
    hub: &HubClient,
    repo: &Repo,
    commit: &str,
    f: &RepoFile,
    full: bool,
    ctx: &Ctx,
) -> Result<Shard> {
    let cache = hub.repo_cache(repo);
    if let Some(p) = cache.cached_file(commit, &f.path) {
        return Shard::local(&f.path, p);
    }
    if hub.settings().offline {
        return Err(hub.offline_error(repo, commit, &f.path, "HF_HUB_OFFLINE is set"));
    }
    if !full {
        let meta = hub.file_metadata(repo, commit, &f.path, ctx)?;
        if let Some(s) = Shard::remote(hub, meta.clone(), ctx)? {
            return Ok(s);
        }
        ctx.message(&format!(
            "{}: server ignores Range requests; downloading the whole file",
            f.path
        ));
        let p = hub.fetch_into_cache(&meta, ctx)?;
        return Shard::local(&f.path, p);
    }
    let p = hub.download(repo, commit, &f.path, ctx)?;
    Shard::local(&f.path, p)
}

/// (shard index, row group, rows to take from it)
type Piece = (usize, usize, usize);

fn plan(shards: &[Shard], keep: u64) -> Vec<Piece> {
    let mut left = keep;
    let mut pieces = Vec::new();
    'outer: for (si, s) in shards.iter().enumerate() {
        for rg in 0..s.metadata.num_row_groups() {
            if left == 0 {
                break 'outer;
            }
            let n = s.metadata.row_group(rg).num_rows().max(0) as u64;
            if n == 0 {
                continue;
            }
            let take = n.min(left);
            pieces.push((si, rg, take as usize));
            left -= take;
        }
    }
    pieces
}

/// Rows of one record batch, encoded (and kept as Arrow when Parquet is written).
struct Chunk {
    json: Vec<u8>,
    batch: Option<RecordBatch>,
    rows: usize,
}

/// How many encoded batches a worker may queue ahead of the writer.
const QUEUE_PER_PIECE: usize = 2;

/// Decodes and encodes `pieces` on `rayon::current_num_threads()` workers and hands the
/// chunks to `sink` in stored order. Each piece has a small bounded queue, so memory stays
/// at a few record batches per worker however large the row groups are, and writing
/// overlaps decoding. Workers take pieces in order; the writer always drains the lowest
/// unfinished piece, which some worker is producing, so the pipeline cannot deadlock.
fn stream_pieces(
    hub: &HubClient,
    shards: &[Shard],
    pieces: &[Piece],
    want_json: bool,
    want_batches: bool,
    ctx: &Ctx,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
    use std::sync::Mutex;

    if pieces.is_empty() {
        return Ok(());
    }
    type Queue = (SyncSender<Result<Chunk>>, Receiver<Result<Chunk>>);
    let (txs, rxs): (Vec<_>, Vec<_>) = pieces
        .iter()
        .map(|_| -> Queue { sync_channel(QUEUE_PER_PIECE) })
        .unzip();
    let txs: Vec<Mutex<Option<SyncSender<Result<Chunk>>>>> =
        txs.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let workers = rayon::current_num_threads().clamp(1, pieces.len());

    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= pieces.len() || stop.load(Ordering::SeqCst) {
                    return;
                }
                let tx = txs[i]
                    .lock()
                    .expect("not poisoned")
                    .take()
                    .expect("taken once");
                let (si, rg, take) = pieces[i];
                let res = shards[si].for_each_batch(hub, rg, take, ctx, &mut |b| {
                    let mut json = Vec::new();
                    if want_json {
                        json.reserve(b.get_array_memory_size() * 9 / 8);
                        jsonl::write_batch(&b, &mut json)?;
                    }
                    let rows = b.num_rows();
                    let chunk = Chunk {
                        json,
                        batch: want_batches.then_some(b),
                        rows,
                    };
                    // A closed queue means the writer gave up: stop quietly.
                    tx.send(Ok(chunk)).map_err(|_| Error::Cancelled)
                });
                if let Err(e) = res {
                    let _ = tx.send(Err(e));
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
            });
        }
        let mut outcome = Ok(());
        for rx in rxs {
            // Ends when the piece's worker drops its sender (piece done).
            for chunk in rx.iter() {
                if let Err(e) = chunk.and_then(|c| {
                    ctx.check()?;
                    sink(c)
                }) {
                    outcome = Err(e);
                    break;
                }
            }
            if outcome.is_err() {
                stop.store(true, Ordering::SeqCst);
                break;
            }
        }
        // Dropping the remaining receivers (end of the loop) unblocks any worker.
        outcome
    })
}

fn write_split(
    hub: &HubClient,
    repo: &Repo,
    commit: &str,
    split: &SplitFiles,
    opts: &DownloadOptions,
    ctx: &Ctx,
) -> Result<SplitOutput> {
    let shards: Vec<Shard> = split
        .files
        .par_iter()
        .map(|f| open_shard(hub, repo, commit, f, opts.full_download, ctx))
        .collect::<Result<_>>()?;
    let total: u64 = shards.iter().map(Shard::num_rows).sum();
    let keep = opts.split_pc.rows_of(total);
    let pieces = plan(&shards, keep);
    let remote_bytes: u64 = pieces
        .iter()
        .filter(|(si, _, _)| {
            matches!(
                shards[*si].location,
                super::parquet_source::ShardLocation::Remote(_)
            )
        })
        .map(|(si, rg, _)| {
            shards[*si]
                .row_group_range(*rg)
                .map(|(a, b)| b - a)
                .unwrap_or(0)
        })
        .sum();
    if remote_bytes > 0 {
        ctx.message(&format!(
            "{}: reading {keep} of {total} rows by byte ranges ({:.1} MB of row groups; shards not cached)",
            split.name,
            remote_bytes as f64 / 1e6
        ));
    }
    let task = ctx.task(&split.name, Some(keep), "rows");

    let mut jsonl_out = None;
    let mut parquet_out = None;
    for fmt in &opts.formats {
        let dest = opts
            .download_dir
            .join(format!("{}.{}", split.name, fmt.ext()));
        let pending = PendingFile::new(dest);
        let file = File::create(&pending.tmp).at(&pending.tmp)?;
        match fmt {
            OutputFormat::Jsonl => {
                jsonl_out = Some((pending, BufWriter::with_capacity(1 << 20, file)))
            }
            OutputFormat::Parquet => {
                parquet_out = Some((pending, Some(file), None::<ArrowWriter<File>>))
            }
        }
    }
    let want_batches = parquet_out.is_some();
    let want_json = jsonl_out.is_some();

    let mut sink = |chunk: Chunk| -> Result<()> {
        if let Some((p, w)) = jsonl_out.as_mut() {
            w.write_all(&chunk.json).at(&p.tmp)?;
        }
        if let (Some((p, file, writer)), Some(b)) = (parquet_out.as_mut(), chunk.batch) {
            if writer.is_none() {
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .build();
                let f = file.take().expect("file is set until the writer exists");
                *writer = Some(
                    ArrowWriter::try_new(f, b.schema(), Some(props))
                        .map_err(|e| Error::data_format(p.dest.display(), e))?,
                );
            }
            writer
                .as_mut()
                .expect("set above")
                .write(&b)
                .map_err(|e| Error::data_format(p.dest.display(), e))?;
        }
        task.advance(chunk.rows as u64);
        Ok(())
    };
    stream_pieces(
        hub,
        &shards,
        &pieces,
        want_json,
        want_batches,
        ctx,
        &mut sink,
    )?;

    let mut paths = Vec::new();
    if let Some((p, mut w)) = jsonl_out {
        // Flushed, not fsync'ed (as `datasets` does): the rename below is what keeps a
        // partial file from ever carrying the final name; forcing the bytes to disk would
        // wait on unrelated write-back and double the warm-cache run time.
        w.flush().at(&p.tmp)?;
        drop(w);
        ctx.check()?;
        paths.push(p.commit()?);
    }
    if let Some((p, file, writer)) = parquet_out {
        match writer {
            Some(w) => {
                w.close()
                    .map_err(|e| Error::data_format(p.dest.display(), e))?;
            }
            None => {
                // No rows: an empty Parquet file with the split's schema.
                let schema = parquet::arrow::parquet_to_arrow_schema(
                    shards[0].metadata.file_metadata().schema_descr(),
                    None,
                )
                .map_err(|e| Error::data_format(&shards[0].name, e))?;
                let f = file.expect("unused file");
                ArrowWriter::try_new(f, std::sync::Arc::new(schema), None)
                    .and_then(|w| w.close().map(|_| ()))
                    .map_err(|e| Error::data_format(p.dest.display(), e))?;
            }
        }
        ctx.check()?;
        paths.push(p.commit()?);
    }
    Ok(SplitOutput {
        split: split.name.clone(),
        rows: keep,
        total_rows: total,
        paths,
        bytes_fetched: remote_bytes,
    })
}
