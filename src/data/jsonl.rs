//! A JSON Lines writer that produces the bytes `datasets.Dataset.to_json` (pandas
//! `to_json(orient="records", lines=True)`, ujson underneath) produces. Hand-written
//! because no JSON library emits pandas' dialect: `\/` for `/`, every non-ASCII character
//! as lowercase `\uXXXX` (astral ones as surrogate pairs), `\b \f \n \r \t` short escapes,
//! other C0 controls as `\u00XX`, DEL and `< > &` raw.
//!
//! Supported Arrow types: strings (all three layouts), integers, booleans, nulls, lists
//! and structs (any nesting) — the types of chat datasets. Floats are written the way
//! pandas writes common values (`1.0`, `0.5`, `1e+20`, NaN/inf as `null`) but are not
//! guaranteed byte-identical for every value.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;

use crate::error::{Error, Result};

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_u16_escape(out: &mut Vec<u8>, unit: u16) {
    out.extend_from_slice(b"\\u");
    out.push(HEX[(unit >> 12) as usize & 0xf]);
    out.push(HEX[(unit >> 8) as usize & 0xf]);
    out.push(HEX[(unit >> 4) as usize & 0xf]);
    out.push(HEX[unit as usize & 0xf]);
}

/// `true` for bytes that end a run of plain ASCII: quote, backslash, slash, C0 controls
/// and every non-ASCII byte.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i < 0x20
            || i >= 0x80
            || i == b'"' as usize
            || i == b'\\' as usize
            || i == b'/' as usize;
        i += 1;
    }
    t
};

/// Appends `s` as a JSON string literal (with quotes) in pandas' escaping.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Copy the longest run of bytes that need no escape in one go.
        let run = bytes[i..]
            .iter()
            .position(|&b| NEEDS_ESCAPE[b as usize])
            .unwrap_or(bytes.len() - i);
        out.extend_from_slice(&bytes[i..i + run]);
        i += run;
        if i == bytes.len() {
            break;
        }
        let b = bytes[i];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' => out.extend_from_slice(b"\\/"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => push_u16_escape(out, b as u16),
            _ => {
                // A multi-byte character starts here: escape it as UTF-16 code units.
                let ch = s[i..]
                    .chars()
                    .next()
                    .expect("valid UTF-8 at a char boundary");
                let mut units = [0u16; 2];
                for u in ch.encode_utf16(&mut units) {
                    push_u16_escape(out, *u);
                }
                i += ch.len_utf8();
                continue;
            }
        }
        i += 1;
    }
    out.push(b'"');
}

fn write_float(v: f64, out: &mut Vec<u8>) {
    if !v.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    let a = v.abs();
    if a != 0.0 && !(1e-10..1e16).contains(&a) {
        let s = format!("{v:e}");
        let (m, e) = s.split_once('e').expect("exponent form");
        let e = if e.starts_with('-') {
            e.to_string()
        } else {
            format!("+{e}")
        };
        out.extend_from_slice(format!("{m}e{e}").as_bytes());
    } else if v.fract() == 0.0 {
        out.extend_from_slice(format!("{:.1}", v).as_bytes());
    } else {
        let s = format!("{v:.10}");
        let s = s.trim_end_matches('0');
        out.extend_from_slice(s.as_bytes());
    }
}

/// Appends the JSON of `array[row]`.
fn write_value(array: &dyn Array, row: usize, out: &mut Vec<u8>) -> Result<()> {
    if array.is_null(row) {
        out.extend_from_slice(b"null");
        return Ok(());
    }
    macro_rules! int {
        ($t:ty) => {{
            let v = array.as_primitive::<$t>().value(row);
            out.extend_from_slice(v.to_string().as_bytes());
        }};
    }
    match array.data_type() {
        DataType::Utf8 => write_str(array.as_string::<i32>().value(row), out),
        DataType::LargeUtf8 => write_str(array.as_string::<i64>().value(row), out),
        DataType::Utf8View => write_str(array.as_string_view().value(row), out),
        DataType::Boolean => out.extend_from_slice(if array.as_boolean().value(row) {
            b"true"
        } else {
            b"false"
        }),
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Float32 => {
            write_float(array.as_primitive::<Float32Type>().value(row) as f64, out)
        }
        DataType::Float64 => write_float(array.as_primitive::<Float64Type>().value(row), out),
        DataType::Null => out.extend_from_slice(b"null"),
        DataType::List(_) => write_list(array.as_list::<i32>().value(row).as_ref(), out)?,
        DataType::LargeList(_) => write_list(array.as_list::<i64>().value(row).as_ref(), out)?,
        DataType::Struct(fields) => {
            let st = array.as_struct();
            out.push(b'{');
            for (i, f) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(f.name(), out);
                out.push(b':');
                write_value(st.column(i).as_ref(), row, out)?;
            }
            out.push(b'}');
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "writing JSON Lines: Arrow type {other} is not supported"
            )))
        }
    }
    Ok(())
}

fn write_list(values: &dyn Array, out: &mut Vec<u8>) -> Result<()> {
    out.push(b'[');
    for i in 0..values.len() {
        if i > 0 {
            out.push(b',');
        }
        write_value(values, i, out)?;
    }
    out.push(b']');
    Ok(())
}

/// Appends one line per row of `batch`: `{"col":value,...}\n`, columns in schema order.
pub fn write_batch(batch: &RecordBatch, out: &mut Vec<u8>) -> Result<()> {
    let schema = batch.schema();
    let mut keys = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let mut k = Vec::new();
        write_str(f.name(), &mut k);
        k.push(b':');
        keys.push(k);
    }
    // datasets converts with `to_pandas(integer_object_nulls=True)`: integer columns with
    // nulls stay integers (3, null), unlike plain pandas (3.0, null).
    for row in 0..batch.num_rows() {
        out.push(b'{');
        for (i, col) in batch.columns().iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&keys[i]);
            write_value(col.as_ref(), row, out)?;
        }
        out.extend_from_slice(b"}\n");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn esc(s: &str) -> String {
        let mut v = Vec::new();
        write_str(s, &mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn pandas_escapes() {
        assert_eq!(esc("caf\u{e9} a/b"), r#""caf\u00e9 a\/b""#);
        assert_eq!(esc("\u{1F600}"), r#""\ud83d\ude00""#);
        assert_eq!(esc("\u{2028}"), r#""\u2028""#);
        assert_eq!(esc("\"\\\n\r\t\u{8}\u{c}"), r#""\"\\\n\r\t\b\f""#);
        assert_eq!(
            esc("\u{0}\u{1}\u{1f}\u{7f}<>&"),
            "\"\\u0000\\u0001\\u001f\u{7f}<>&\""
        );
        assert_eq!(esc(""), "\"\"");
    }

    #[test]
    fn floats_like_pandas() {
        let f = |v: f64| {
            let mut o = Vec::new();
            write_float(v, &mut o);
            String::from_utf8(o).unwrap()
        };
        assert_eq!(f(1.0), "1.0");
        assert_eq!(f(1.5), "1.5");
        assert_eq!(f(0.1), "0.1");
        assert_eq!(f(1e20), "1e+20");
        assert_eq!(f(f64::NAN), "null");
    }

    proptest! {
        // Whatever the string, the output parses back to it as JSON and is pure ASCII.
        #[test]
        fn roundtrips_through_a_json_parser(s in any::<String>()) {
            let e = esc(&s);
            prop_assert!(e.is_ascii());
            let back: String = serde_json::from_str(&e).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
