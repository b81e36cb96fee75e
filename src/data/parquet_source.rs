//! Parquet shards, local or remote. A remote shard is opened by reading only its footer
//! (HTTP Range); afterwards each needed row group is fetched as one byte range, so a 5 %
//! prefix of a split moves about 5 % of its bytes instead of whole shards.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::file::metadata::{FooterTail, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::reader::{ChunkReader, Length};

use crate::error::{Error, IoContext, Result};
use crate::hub::{FileMeta, HubClient, RangeRead};
use crate::progress::Ctx;

/// Where a shard's bytes are.
#[derive(Debug, Clone)]
pub enum ShardLocation {
    Local(PathBuf),
    Remote(FileMeta),
}

/// An opened shard: its location and its footer metadata.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Path inside the repository (for messages).
    pub name: String,
    pub location: ShardLocation,
    pub metadata: Arc<ParquetMetaData>,
}

/// Footer bytes to ask for first: enough for the metadata of most files in one request.
const FOOTER_GUESS: u64 = 64 << 10;

fn parquet_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::data_format(name, format!("not a readable Parquet file: {e}"))
}

impl Shard {
    /// Opens a local file and reads its footer.
    pub fn local(name: &str, path: PathBuf) -> Result<Self> {
        let file = File::open(&path).at(&path)?;
        let md = ParquetMetaDataReader::new()
            .parse_and_finish(&file)
            .map_err(|e| parquet_err(name, e))?;
        Ok(Self {
            name: name.to_string(),
            location: ShardLocation::Local(path),
            metadata: Arc::new(md),
        })
    }

    /// Opens a remote file by reading its footer with Range requests. `Ok(None)` when the
    /// server does not do ranges (the caller then downloads the whole file).
    pub fn remote(hub: &HubClient, meta: FileMeta, ctx: &Ctx) -> Result<Option<Self>> {
        let name = meta.path.clone();
        if meta.size < 12 {
            return Err(parquet_err(
                &name,
                "file is shorter than a Parquet header and footer",
            ));
        }
        let tail_len = meta.size.min(FOOTER_GUESS);
        let RangeRead::Bytes(mut tail) =
            hub.read_range(&meta, meta.size - tail_len, meta.size, ctx)?
        else {
            return Ok(None);
        };
        let last8: [u8; 8] = tail[tail.len() - 8..].try_into().expect("8 bytes");
        let footer = FooterTail::try_new(&last8).map_err(|e| parquet_err(&name, e))?;
        if footer.is_encrypted_footer() {
            return Err(parquet_err(
                &name,
                "encrypted Parquet files are not supported",
            ));
        }
        let need = footer.metadata_length() as u64 + 8;
        if need > meta.size {
            return Err(parquet_err(&name, "footer length exceeds the file size"));
        }
        if need > tail.len() as u64 {
            let RangeRead::Bytes(more) =
                hub.read_range(&meta, meta.size - need, meta.size - tail.len() as u64, ctx)?
            else {
                return Ok(None);
            };
            let mut all = more;
            all.extend_from_slice(&tail);
            tail = all;
        }
        let md_bytes = &tail[tail.len() - need as usize..tail.len() - 8];
        let md =
            ParquetMetaDataReader::decode_metadata(md_bytes).map_err(|e| parquet_err(&name, e))?;
        Ok(Some(Self {
            name,
            location: ShardLocation::Remote(meta),
            metadata: Arc::new(md),
        }))
    }

    pub fn num_rows(&self) -> u64 {
        self.metadata.file_metadata().num_rows().max(0) as u64
    }

    pub fn file_len(&self) -> Result<u64> {
        match &self.location {
            ShardLocation::Local(p) => Ok(std::fs::metadata(p).at(p)?.len()),
            ShardLocation::Remote(m) => Ok(m.size),
        }
    }

    /// Byte range `[start, end)` covering every column chunk of row group `rg`.
    pub fn row_group_range(&self, rg: usize) -> Result<(u64, u64)> {
        let len = self.file_len()?;
        let g = self.metadata.row_group(rg);
        let mut lo = u64::MAX;
        let mut hi = 0u64;
        for c in g.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let size = c.compressed_size();
            if start < 0 || size < 0 || (start as u64).saturating_add(size as u64) > len {
                return Err(parquet_err(
                    &self.name,
                    format!("row group {rg} points outside the file"),
                ));
            }
            lo = lo.min(start as u64);
            hi = hi.max(start as u64 + size as u64);
        }
        if lo > hi {
            return Ok((0, 0));
        }
        Ok((lo, hi))
    }

    /// Decodes the first `limit` rows of row group `rg`, handing each record batch to `f`
    /// as soon as it is decoded (so only one batch is alive at a time).
    pub fn for_each_batch(
        &self,
        hub: &HubClient,
        rg: usize,
        limit: usize,
        ctx: &Ctx,
        f: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()> {
        ctx.check()?;
        let amd =
            ArrowReaderMetadata::try_new(Arc::clone(&self.metadata), ArrowReaderOptions::new())
                .map_err(|e| parquet_err(&self.name, e))?;
        match &self.location {
            ShardLocation::Local(p) => {
                let file = File::open(p).at(p)?;
                let b = ParquetRecordBatchReaderBuilder::new_with_metadata(file, amd);
                stream(b, rg, limit, &self.name, ctx, f)
            }
            ShardLocation::Remote(meta) => {
                let (lo, hi) = self.row_group_range(rg)?;
                let bytes = match hub.read_range(meta, lo, hi, ctx)? {
                    RangeRead::Bytes(b) => b,
                    RangeRead::Unsupported => {
                        return Err(Error::Protocol(format!(
                            "{}: the server stopped honouring Range requests",
                            self.name
                        )))
                    }
                };
                let piece = Piece {
                    offset: lo,
                    bytes: Bytes::from(bytes),
                    len: meta.size,
                };
                let b = ParquetRecordBatchReaderBuilder::new_with_metadata(piece, amd);
                stream(b, rg, limit, &self.name, ctx, f)
            }
        }
    }

    /// Uncompressed bytes of the first `limit` rows of row group `rg` (an estimate, for
    /// sizing output buffers).
    pub fn estimated_bytes(&self, rg: usize, limit: usize) -> usize {
        let g = self.metadata.row_group(rg);
        let rows = g.num_rows().max(1) as u128;
        let total = g.total_byte_size().max(0) as u128;
        (total * (limit as u128).min(rows) / rows) as usize
    }
}

fn stream<T: ChunkReader + 'static>(
    b: ParquetRecordBatchReaderBuilder<T>,
    rg: usize,
    limit: usize,
    name: &str,
    ctx: &Ctx,
    f: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let reader = b
        .with_row_groups(vec![rg])
        .with_limit(limit)
        // Small batches keep peak memory low (measured: 256 rows → ~50 MB peak RSS for a
        // 5 % ultrachat download vs ~190 MB at 1024) at no cost in speed.
        .with_batch_size(256)
        .build()
        .map_err(|e| parquet_err(name, e))?;
    for batch in reader {
        ctx.check()?;
        f(batch.map_err(|e| parquet_err(name, format!("row group {rg}: {e}")))?)?;
    }
    Ok(())
}

/// One fetched byte range of a remote file, readable as if it were the file (reads
/// outside the range are a format error: the metadata pointed somewhere else).
struct Piece {
    offset: u64,
    bytes: Bytes,
    len: u64,
}

impl Length for Piece {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for Piece {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        let end = self.offset + self.bytes.len() as u64;
        self.get_bytes(start, (end.saturating_sub(start)) as usize)
            .map(|b| b.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let end = start + length as u64;
        if start < self.offset || end > self.offset + self.bytes.len() as u64 {
            return Err(parquet::errors::ParquetError::General(format!(
                "read of bytes {start}..{end} outside the fetched row group {}..{}",
                self.offset,
                self.offset + self.bytes.len() as u64
            )));
        }
        let s = (start - self.offset) as usize;
        Ok(self.bytes.slice(s..s + length))
    }
}
