//! The tokenized dataset on disk: Parquet or Arrow IPC with list<int32> columns
//! `input_ids`, `labels`, `position_ids` and `seq_lengths`, plus a JSON description of how
//! it was made under the `ferrotune` metadata key. Written under a temporary name and
//! renamed when complete; read back into flat arrays for training and for numpy.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::pack::Row;
use crate::data::pending_file::PendingFile;
use crate::error::{Error, IoContext, Result};

/// Metadata key holding the JSON description of the dataset.
pub const METADATA_KEY: &str = "ferrotune";
/// The columns, in order.
pub const COLUMNS: [&str; 4] = ["input_ids", "labels", "position_ids", "seq_lengths"];

/// File formats for tokenized data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    Parquet,
    ArrowIpc,
}

impl RowFormat {
    /// From the file name: `.parquet`, or `.arrow` / `.feather` / `.ipc` for Arrow IPC.
    pub fn of(path: &Path) -> Result<Self> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".parquet") {
            Ok(Self::Parquet)
        } else if name.ends_with(".arrow") || name.ends_with(".feather") || name.ends_with(".ipc") {
            Ok(Self::ArrowIpc)
        } else {
            Err(Error::InvalidArgument(format!(
                "{}: the output must end in .parquet or .arrow",
                path.display()
            )))
        }
    }
}

fn schema(metadata: HashMap<String, String>) -> Arc<Schema> {
    let list = || DataType::List(Arc::new(Field::new("item", DataType::Int32, true)));
    Arc::new(
        Schema::new(
            COLUMNS
                .iter()
                .map(|c| Field::new(*c, list(), false))
                .collect::<Vec<_>>(),
        )
        .with_metadata(metadata),
    )
}

enum Inner {
    Parquet(ArrowWriter<BufWriter<File>>),
    Ipc(arrow_ipc::writer::FileWriter<BufWriter<File>>),
}

/// Writes rows to a new file that appears under its name only on [`RowWriter::finish`].
pub struct RowWriter {
    pending: PendingFile,
    schema: Arc<Schema>,
    inner: Inner,
}

impl RowWriter {
    pub fn create(dest: &Path, description: &serde_json::Value) -> Result<Self> {
        let format = RowFormat::of(dest)?;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        let pending = PendingFile::new(dest.to_path_buf());
        let file = BufWriter::with_capacity(1 << 20, File::create(&pending.tmp).at(&pending.tmp)?);
        let meta = HashMap::from([(METADATA_KEY.to_string(), description.to_string())]);
        let schema = schema(meta);
        let err = |e: &dyn std::fmt::Display| Error::data_format(dest.display(), e);
        let inner = match format {
            RowFormat::Parquet => {
                // Snappy: fast to write and read; token ids compress little further.
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(8192))
                    .build();
                Inner::Parquet(
                    ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| err(&e))?,
                )
            }
            RowFormat::ArrowIpc => Inner::Ipc(
                arrow_ipc::writer::FileWriter::try_new(file, &schema).map_err(|e| err(&e))?,
            ),
        };
        Ok(Self {
            pending,
            schema,
            inner,
        })
    }

    /// Appends rows.
    pub fn write(&mut self, rows: &[Row]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut cols: Vec<ListBuilder<Int32Builder>> = (0..4)
            .map(|_| {
                ListBuilder::new(Int32Builder::new()).with_field(Arc::new(Field::new(
                    "item",
                    DataType::Int32,
                    true,
                )))
            })
            .collect();
        for r in rows {
            // Token ids and lengths are < 2^31, so `as i32` is lossless.
            let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
            cols[0].values().append_slice(&as_i32(&r.input_ids));
            cols[1].values().append_slice(&r.labels);
            cols[2].values().append_slice(&as_i32(&r.position_ids));
            cols[3].values().append_slice(&as_i32(&r.seq_lengths));
            for c in cols.iter_mut() {
                c.append(true);
            }
        }
        let arrays: Vec<ArrayRef> = cols
            .iter_mut()
            .map(|c| Arc::new(c.finish()) as ArrayRef)
            .collect();
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).expect("schema matches");
        let tmp = self.pending.tmp.display().to_string();
        match &mut self.inner {
            Inner::Parquet(w) => w.write(&batch).map_err(|e| Error::data_format(&tmp, e)),
            Inner::Ipc(w) => w.write(&batch).map_err(|e| Error::data_format(&tmp, e)),
        }
    }

    /// Closes the file and renames it into place.
    pub fn finish(self) -> Result<PathBuf> {
        let tmp = self.pending.tmp.display().to_string();
        match self.inner {
            Inner::Parquet(w) => {
                w.close().map_err(|e| Error::data_format(&tmp, e))?;
            }
            Inner::Ipc(mut w) => {
                w.finish().map_err(|e| Error::data_format(&tmp, e))?;
            }
        }
        self.pending.commit()
    }
}

/// A tokenized dataset read back as flat arrays (all rows concatenated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizedRows {
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<i32>,
    /// `row_offsets[i]..row_offsets[i + 1]` is row `i` in the token arrays.
    pub row_offsets: Vec<i64>,
    /// Conversation lengths of all rows, concatenated.
    pub seq_lengths: Vec<i32>,
    /// `seq_offsets[i]..seq_offsets[i + 1]` are row `i`'s entries in `seq_lengths`.
    pub seq_offsets: Vec<i64>,
    /// The JSON description written with the data.
    pub description: Option<String>,
}

impl TokenizedRows {
    pub fn num_rows(&self) -> usize {
        self.row_offsets.len().saturating_sub(1)
    }

    fn append(&mut self, batch: &RecordBatch, path: &Path) -> Result<()> {
        let bad = |m: String| Error::data_format(path.display(), m);
        let col = |name: &str| -> Result<&arrow_array::ListArray> {
            let c = batch.column_by_name(name).ok_or_else(|| {
                bad(format!(
                    "no \"{name}\" column; not a ferrotune tokenized dataset"
                ))
            })?;
            c.as_list_opt::<i32>()
                .filter(|l| l.values().data_type() == &DataType::Int32)
                .ok_or_else(|| {
                    bad(format!(
                        "column \"{name}\" is {}, not list<int32>",
                        c.data_type()
                    ))
                })
        };
        let (ids, labels, pos, seqs) = (
            col("input_ids")?,
            col("labels")?,
            col("position_ids")?,
            col("seq_lengths")?,
        );
        let flat = |l: &arrow_array::ListArray, out: &mut Vec<i32>| {
            let o = l.value_offsets();
            let v = l.values().as_primitive::<Int32Type>().values();
            out.extend_from_slice(&v[o[0] as usize..o[l.len()] as usize]);
        };
        if self.row_offsets.is_empty() {
            self.row_offsets.push(0);
            self.seq_offsets.push(0);
        }
        for i in 0..ids.len() {
            let n = ids.value_length(i);
            if labels.value_length(i) != n || pos.value_length(i) != n {
                return Err(bad(format!(
                    "row {}: columns of different lengths",
                    self.num_rows()
                )));
            }
            let last = *self.row_offsets.last().expect("pushed above");
            self.row_offsets.push(last + n as i64);
            let last = *self.seq_offsets.last().expect("pushed above");
            self.seq_offsets.push(last + seqs.value_length(i) as i64);
        }
        flat(ids, &mut self.input_ids);
        flat(labels, &mut self.labels);
        flat(pos, &mut self.position_ids);
        flat(seqs, &mut self.seq_lengths);
        Ok(())
    }

    /// Reads a file written by [`RowWriter`] (either format).
    pub fn read(path: &Path) -> Result<Self> {
        let mut out = TokenizedRows {
            row_offsets: vec![0],
            seq_offsets: vec![0],
            ..Default::default()
        };
        let file = File::open(path).at(path)?;
        let bad = |e: &dyn std::fmt::Display| Error::data_format(path.display(), e);
        match RowFormat::of(path)? {
            RowFormat::Parquet => {
                let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
                out.description = b.schema().metadata().get(METADATA_KEY).cloned();
                for batch in b.build().map_err(|e| bad(&e))? {
                    out.append(&batch.map_err(|e| bad(&e))?, path)?;
                }
            }
            RowFormat::ArrowIpc => {
                let r = arrow_ipc::reader::FileReader::try_new(file, None).map_err(|e| bad(&e))?;
                out.description = r.schema().metadata().get(METADATA_KEY).cloned();
                for batch in r {
                    out.append(&batch.map_err(|e| bad(&e))?, path)?;
                }
            }
        }
        Ok(out)
    }
}
