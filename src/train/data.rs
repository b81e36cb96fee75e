//! Training data: conversations are tokenized (and packed) with the model's own tokenizer
//! unless the file is already a ferrotune tokenized file; micro-batches are groups of rows.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{Strategy, TrainConfig};
use super::distributed::Group;
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

/// Where the tokenized files of conversation data come from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Tokenize into this folder (a single process, or the writer of a node).
    Tokenize(&'a Path),
    /// Read what another process of this node tokenized into this folder (the same
    /// configuration makes the same file names).
    Read(&'a Path),
}

/// Reads or tokenizes the train (and validation) data; see [`Source`]. Files that are
/// already tokenized are read as they are, whatever the source.
pub fn prepare(cfg: &TrainConfig, source: Source<'_>, ctx: &Ctx) -> Result<Data> {
    let evaluate = cfg.evaluation_strategy != Strategy::No;
    let mut tokenizer: Option<ChatTokenizer> = None;
    let mut tokenize = |src: &Path,
                        dest: &str,
                        records: Option<std::ops::Range<u64>>|
     -> Result<(TokenizedRows, PathBuf)> {
        let out = match source {
            Source::Tokenize(out) => out,
            Source::Read(dir) => {
                let dest = dir.join(dest);
                let rows = TokenizedRows::read(&dest)?;
                ctx.message(&format!(
                    "{}: read the rows tokenized by this node's LOCAL_RANK 0 ({} rows)",
                    src.display(),
                    rows.num_rows()
                ));
                return Ok((rows, dest));
            }
        };
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

/// FNV-1a over a split's token ids and labels: cheap, and enough to tell different data apart.
pub fn digest(rows: &TokenizedRows) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let ids = rows.input_ids.iter().map(|&t| t as u64);
    let labels = rows.labels.iter().map(|&l| l as u64);
    for v in ids.chain(labels) {
        h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A node's tokenized files (or, for rank 0, the file naming where they are), removed
/// when dropped: by then every process of the node has read them.
struct NodeDir(PathBuf);

impl Drop for NodeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// In a node folder of rank 0: the folder its files really are in (`output_dir/tokenized`).
const LOCATION: &str = "location";

/// Data-parallel [`prepare`]: the process with `LOCAL_RANK` 0 on each node tokenizes, the
/// node's other processes wait for it and read its files. Rank 0 writes into
/// `output_dir/tokenized`, as a single process does; another node's writer into
/// `$TMPDIR/ferrotune-tokenized-{run}-rank{r}`, removed once every rank has its rows. The
/// wait is a group exchange, so `FERROTUNE_DIST_TIMEOUT` bounds it and a writer that
/// fails or dies ends it with an error on every rank. Finally every rank's rows are
/// compared with rank 0's.
pub fn prepare_in_group(
    cfg: &TrainConfig,
    local_rank: usize,
    group: &mut Group,
    ctx: &Ctx,
) -> Result<Data> {
    let (rank, world) = (group.rank, group.size);
    // This run's folder names: rank 0 draws a number, every rank gets it.
    let mut run = [0.0];
    if rank == 0 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        run[0] = ((t ^ (u64::from(std::process::id()) << 24)) & ((1 << 48) - 1)) as f64;
    }
    group.sum_f64(&mut run)?;
    let run = run[0] as u64;
    let node_dir =
        |r: usize| std::env::temp_dir().join(format!("ferrotune-tokenized-{run:012x}-rank{r}"));

    let writer = local_rank == 0;
    let _node = writer.then(|| NodeDir(node_dir(rank)));
    let written = if writer {
        Some(tokenize_for_node(cfg, rank, &node_dir(rank), ctx))
    } else {
        ctx.message(&format!(
            "data-parallel: rank {rank} waits for its node's LOCAL_RANK 0 to prepare the data"
        ));
        None
    };
    // Each node's writer says how it went (1 done, 2 failed); the others wait for it here.
    let mut status = vec![0.0; world];
    if let Some(w) = &written {
        status[rank] = if w.is_ok() { 1.0 } else { 2.0 };
    }
    group.sum_f64(&mut status).map_err(|e| {
        Error::Training(format!(
            "data-parallel: waiting for every node's LOCAL_RANK 0 to prepare the data (at most FERROTUNE_DIST_TIMEOUT) failed: {e}"
        ))
    })?;
    let ranks_with = |s: f64| -> Vec<usize> { (0..world).filter(|&r| status[r] == s).collect() };
    let written = match written {
        Some(Err(e)) => return Err(e),
        Some(Ok(data)) => Some(data),
        None => None,
    };
    let failed = ranks_with(2.0);
    if !failed.is_empty() {
        return Err(Error::Training(format!(
            "data-parallel: preparing the data failed on rank(s) {} (LOCAL_RANK 0 of a node, which tokenizes for its node); that rank's log has the cause",
            join(&failed)
        )));
    }
    let data = match written {
        Some(data) => Ok(data),
        None => {
            // The writer of this node: the one whose folder is in this node's temp dir.
            let here: Vec<usize> = ranks_with(1.0)
                .into_iter()
                .filter(|&r| node_dir(r).is_dir())
                .collect();
            let guess = rank.checked_sub(local_rank);
            match here.as_slice() {
                [one] => Ok(*one),
                [] => Err(format!("no folder of this run in {}: every node needs a process with LOCAL_RANK 0, and all processes of a node the same TMPDIR", std::env::temp_dir().display())),
                many if guess.is_some_and(|g| many.contains(&g)) => Ok(guess.expect("some")),
                many => Err(format!("the folders of ranks {} are all in {}; cannot tell which is this node's LOCAL_RANK 0", join(many), std::env::temp_dir().display())),
            }
            .map_err(|why| Error::Training(format!("data-parallel: rank {rank} cannot find its node's tokenized data: {why}")))
            .and_then(|writer| {
                let dir = node_dir(writer);
                let location = dir.join(LOCATION);
                let dir = match std::fs::read_to_string(&location) {
                    Ok(p) => PathBuf::from(p),
                    Err(_) => dir,
                };
                prepare(cfg, Source::Read(&dir), ctx)
            })
        }
    };
    // Every rank's rows against rank 0's: [prepared, rows, digest high, digest low] each.
    let mut mine = [0.0; 4];
    if let Ok(d) = &data {
        let mut h = digest(&d.train);
        if let Some(v) = &d.validation {
            h = h.rotate_left(17) ^ digest(v) ^ (v.num_rows() as u64);
        }
        mine = [
            1.0,
            d.train.num_rows() as f64,
            (h >> 32) as f64,
            (h & 0xffff_ffff) as f64,
        ];
    }
    let mut all = vec![0.0; 4 * world];
    all[4 * rank..4 * rank + 4].copy_from_slice(&mine);
    group.sum_f64(&mut all)?;
    let data = data?;
    let of = |r: usize| &all[4 * r..4 * r + 4];
    let unprepared: Vec<usize> = (0..world).filter(|&r| of(r)[0] == 0.0).collect();
    if !unprepared.is_empty() {
        return Err(Error::Training(format!(
            "data-parallel: rank(s) {} could not read their node's tokenized data; their logs have the cause",
            join(&unprepared)
        )));
    }
    let differ: Vec<usize> = (1..world).filter(|&r| of(r) != of(0)).collect();
    if let Some(&r) = differ.first() {
        return Err(Error::Training(format!(
            "data-parallel: rank(s) {} prepared different training data than rank 0 ({} train rows on rank {r}, {} on rank 0{}). Every process needs the same data files, parameters and ferrotune version",
            join(&differ),
            of(r)[1],
            of(0)[1],
            if of(r)[1] == of(0)[1] { "; the tokens differ" } else { "" }
        )));
    }
    Ok(data)
}

/// The node writer's part: rank 0 tokenizes into `output_dir/tokenized` and leaves the
/// path in its node folder `dir`; another node's writer tokenizes into `dir` itself.
fn tokenize_for_node(cfg: &TrainConfig, rank: usize, dir: &Path, ctx: &Ctx) -> Result<Data> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if rank != 0 {
        return prepare(cfg, Source::Tokenize(dir), ctx);
    }
    let out = std::path::absolute(cfg.output_dir.join("tokenized"))
        .map_err(|e| Error::io(&cfg.output_dir, e))?;
    let data = prepare(cfg, Source::Tokenize(&out), ctx)?;
    let p = dir.join(LOCATION);
    std::fs::write(&p, out.to_string_lossy().as_bytes()).map_err(|e| Error::io(&p, e))?;
    Ok(data)
}

fn join(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
