//! Reading conversations from JSON Lines and Parquet files, in chunks.
//!
//! JSON lines are handed out unparsed so the caller can parse them in parallel; Parquet
//! files are read one column (`messages`) at a time, in batches. Rows keep their position
//! (1-based line for JSONL, 0-based row for Parquet) so errors and drops can name them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde::Deserialize;
use serde_json::Value as Json;

use super::conversation::Message;
use crate::error::{Error, IoContext, Result};

/// A row not yet checked.
#[derive(Debug)]
pub enum PendingRow {
    /// A JSON line (1-based line number), parsed by [`parse_json_line`].
    Json { line: u64, text: String },
    /// A decoded row (0-based row index in the file).
    Decoded { row: u64, conv: RawConversation },
}

impl PendingRow {
    /// "line 7" or "row 6", for messages.
    pub fn position(&self) -> String {
        match self {
            PendingRow::Json { line, .. } => format!("line {line}"),
            PendingRow::Decoded { row, .. } => format!("row {row}"),
        }
    }
}

/// A conversation as found in the data (no messages for a null `messages`).
#[derive(Debug, Default)]
pub struct RawConversation {
    pub messages: Vec<Message>,
    /// Some message's content (or the message itself) was not a string.
    pub non_string_content: bool,
}

/// The input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    JsonLines,
    Parquet,
}

impl InputFormat {
    pub fn of(path: &Path) -> Result<Self> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson") {
            Ok(Self::JsonLines)
        } else if name.ends_with(".parquet") {
            Ok(Self::Parquet)
        } else {
            Err(Error::InvalidArgument(format!(
                "{}: unknown data file type; use .jsonl/.json (JSON Lines) or .parquet",
                path.display()
            )))
        }
    }
}

/// Hands out chunks of rows of one file.
pub enum RowReader {
    Json {
        path: PathBuf,
        reader: BufReader<File>,
        line: u64,
    },
    Parquet {
        path: PathBuf,
        batches: ParquetRecordBatchReader,
        row: u64,
        total: u64,
        content_is_text: bool,
    },
}

impl RowReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        match InputFormat::of(path)? {
            InputFormat::JsonLines => Ok(Self::Json {
                path: path.to_path_buf(),
                reader: BufReader::with_capacity(1 << 20, file),
                line: 0,
            }),
            InputFormat::Parquet => open_parquet(path, file),
        }
    }

    /// Rows in the file when known without reading it (Parquet).
    pub fn total_rows(&self) -> Option<u64> {
        match self {
            RowReader::Json { .. } => None,
            RowReader::Parquet { total, .. } => Some(*total),
        }
    }

    /// Up to `n` more rows; empty at the end of the file.
    pub fn next_chunk(&mut self, n: usize) -> Result<Vec<PendingRow>> {
        let mut out = Vec::with_capacity(n);
        match self {
            RowReader::Json { path, reader, line } => {
                while out.len() < n {
                    let mut buf = Vec::new();
                    let read = reader.read_until(b'\n', &mut buf).at(path.as_path())?;
                    if read == 0 {
                        break;
                    }
                    *line += 1;
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let text = String::from_utf8(buf).map_err(|_| {
                        Error::data_format(path.display(), format!("line {line}: not valid UTF-8"))
                    })?;
                    out.push(PendingRow::Json { line: *line, text });
                }
            }
            RowReader::Parquet {
                path,
                batches,
                row,
                content_is_text,
                ..
            } => {
                while out.len() < n {
                    let Some(batch) = batches.next() else { break };
                    let batch = batch.map_err(|e| {
                        Error::data_format(path.display(), format!("unreadable Parquet data: {e}"))
                    })?;
                    decode_batch(&batch, *content_is_text, row, &mut out);
                }
            }
        }
        Ok(out)
    }
}

/// Wrapper that tells an absent `messages` key from `"messages": null`.
#[derive(Default)]
enum Field {
    #[default]
    Absent,
    Present(Json),
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Json::deserialize(d).map(Field::Present)
    }
}

#[derive(Deserialize)]
struct JsonRow {
    #[serde(default)]
    messages: Field,
}

/// Parses one JSON line. A line that is not a JSON object with a `messages` key is a
/// [`Error::DataFormat`] naming the file and line.
pub fn parse_json_line(path: &Path, line: u64, text: &str) -> Result<RawConversation> {
    let bad = |msg: String| Error::data_format(path.display(), format!("line {line}: {msg}"));
    let row: JsonRow =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let messages = match row.messages {
        Field::Absent => {
            return Err(bad(
                "no \"messages\" key; each line must be an object with a \"messages\" list of {\"role\", \"content\"}".into(),
            ))
        }
        Field::Present(Json::Null) => return Ok(RawConversation::default()),
        Field::Present(Json::Array(a)) => a,
        Field::Present(other) => {
            return Err(bad(format!(
                "\"messages\" must be a list of {{\"role\", \"content\"}} objects, not {}",
                json_kind(&other)
            )))
        }
    };
    let mut conv = RawConversation::default();
    for m in messages {
        let (role, content) = match m {
            Json::Object(mut o) => (o.remove("role"), o.remove("content")),
            _ => (None, None),
        };
        let role = match role {
            Some(Json::String(s)) => s,
            _ => String::new(),
        };
        let content = match content {
            Some(Json::String(s)) => s,
            _ => {
                conv.non_string_content = true;
                String::new()
            }
        };
        conv.messages.push(Message { role, content });
    }
    Ok(conv)
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8)
}

fn open_parquet(path: &Path, file: File) -> Result<RowReader> {
    let bad = |msg: String| Error::data_format(path.display(), msg);
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let schema = builder.schema().clone();
    let expected = "a \"messages\" column of list<struct<role: string, content: string>>";
    let Some((idx, field)) = schema.column_with_name("messages") else {
        let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(bad(format!(
            "no \"messages\" column (columns: {}); expected {expected}",
            names.join(", ")
        )));
    };
    let item = match field.data_type() {
        DataType::List(f) | DataType::LargeList(f) => f.data_type().clone(),
        other => {
            return Err(bad(format!(
                "column \"messages\" has type {other}; expected {expected}"
            )))
        }
    };
    let DataType::Struct(fields) = &item else {
        return Err(bad(format!(
            "column \"messages\" holds {item}; expected {expected}"
        )));
    };
    let role_ok = fields
        .iter()
        .any(|f| f.name() == "role" && is_text(f.data_type()));
    let content = fields.iter().find(|f| f.name() == "content");
    if !role_ok || content.is_none() {
        return Err(bad(format!(
            "column \"messages\" holds {item}; expected {expected}"
        )));
    }
    let content_is_text = content.is_some_and(|f| is_text(f.data_type()));
    let total = builder.metadata().file_metadata().num_rows().max(0) as u64;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let batches = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(|e| bad(format!("unreadable Parquet data: {e}")))?;
    Ok(RowReader::Parquet {
        path: path.to_path_buf(),
        batches,
        row: 0,
        total,
        content_is_text,
    })
}

/// A string column of either offset width.
fn str_at(a: &ArrayRef, i: usize) -> Option<&str> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i)),
        _ => None,
    }
}

fn decode_batch(
    batch: &RecordBatch,
    content_is_text: bool,
    row: &mut u64,
    out: &mut Vec<PendingRow>,
) {
    let col = batch.column(0);
    let n = col.len();
    let item_range = |i: usize| -> (usize, usize) {
        match col.data_type() {
            DataType::List(_) => {
                let o = col.as_list::<i32>().value_offsets();
                (o[i] as usize, o[i + 1] as usize)
            }
            _ => {
                let o = col.as_list::<i64>().value_offsets();
                (o[i] as usize, o[i + 1] as usize)
            }
        }
    };
    let values: &StructArray = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().values().as_struct(),
        _ => col.as_list::<i64>().values().as_struct(),
    };
    let role = values.column_by_name("role").expect("checked at open");
    let content = values.column_by_name("content").expect("checked at open");
    for i in 0..n {
        let mut conv = RawConversation::default();
        if col.is_valid(i) {
            let (a, b) = item_range(i);
            for k in a..b {
                if values.is_null(k) {
                    conv.non_string_content = true;
                    conv.messages.push(Message {
                        role: String::new(),
                        content: String::new(),
                    });
                    continue;
                }
                let text = if content_is_text {
                    str_at(content, k)
                } else {
                    None
                };
                if text.is_none() {
                    conv.non_string_content = true;
                }
                conv.messages.push(Message {
                    role: str_at(role, k).unwrap_or_default().to_string(),
                    content: text.unwrap_or_default().to_string(),
                });
            }
        }
        out.push(PendingRow::Decoded { row: *row, conv });
        *row += 1;
    }
}
