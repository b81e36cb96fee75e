//! The chat template environment, configured like `transformers`' jinja environment
//! (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[loopcontrols])` with `raise_exception`, `strftime_now` and a `tojson` that
//! is `json.dumps(ensure_ascii=False)`), on minijinja with the Python method shims of
//! minijinja-contrib's `pycompat` (`.strip()`, `.startswith()`, `.items()`, ...).

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";
/// Prefix of the error detail produced by `raise_exception`, so a template's own refusal
/// of a conversation can be told from a bug in the template.
const RAISED: &str = "raise_exception: ";

/// What went wrong while rendering one conversation.
#[derive(Debug)]
pub enum RenderError {
    /// The template called `raise_exception(message)`: it refuses this conversation.
    Raised(String),
    /// Any other failure (undefined attribute, type error...): the template and the data
    /// do not fit together.
    Failed(String),
}

/// A compiled chat template plus the special-token variables it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` (those that are set), as a map.
    special: Value,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is an [`Error::Template`] naming `origin`.
    pub fn new(source: &str, special: Vec<(&'static str, String)>, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("static syntax config"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: String| strftime_utc(&fmt, now_unix()));
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| {
                Error::Template(format!(
                    "{origin}: the chat template does not compile: {e:#}"
                ))
            })?;
        let special = Value::from_pairs(special.into_iter().map(|(k, v)| (k, Value::from(v))));
        Ok(Self { env, special })
    }

    /// Renders `messages` (a sequence of message maps) as transformers'
    /// `apply_chat_template(tokenize=False)` does.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
    ) -> std::result::Result<String, RenderError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("added at construction");
        let ctx = minijinja::context! {
            messages => messages.clone(),
            add_generation_prompt => add_generation_prompt,
            tools => Value::from(()),
            documents => Value::from(()),
            ..self.special.clone()
        };
        tmpl.render(ctx).map_err(|e| {
            let detail = e.detail().unwrap_or_default();
            match detail.strip_prefix(RAISED) {
                Some(msg) if e.kind() == ErrorKind::InvalidOperation => {
                    RenderError::Raised(msg.to_string())
                }
                _ => RenderError::Failed(format!("{e:#}")),
            }
        })
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`. Written here because minijinja's own `tojson`
/// escapes HTML characters and uses compact separators, which changes the rendered text.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(i64::try_from(v).unwrap_or(0).max(0) as usize),
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a: Vec<Value> = s.try_iter()?.collect();
            let get = |i: usize| a.get(i).and_then(|v| v.as_str()).unwrap_or("").to_string();
            (get(0), get(1))
        }
        _ if indent.is_some() => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    let f = PyJson {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    f.write(&json, 0, &mut out);
    Ok(out)
}

/// Python's `json.dumps` layout.
struct PyJson<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &serde_json::Value, level: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => out.push_str(&n.to_string()),
            J::String(s) => py_json_str(s, out),
            J::Array(a) if a.is_empty() => out.push_str("[]"),
            J::Object(o) if o.is_empty() => out.push_str("{}"),
            J::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            J::Object(o) => {
                let mut items: Vec<_> = o.iter().collect();
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(level + 1, out);
                    py_json_str(k, out);
                    out.push_str(self.key_sep);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }
}

fn py_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `datetime.now().strftime(fmt)` for the directives chat templates use (UTC; Azure ML
/// nodes run in UTC). Unknown directives are kept as written.
pub fn strftime_utc(fmt: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python() {
        // python -c "import datetime as d; print(d.datetime.utcfromtimestamp(1764049231).strftime('%Y-%m-%d %H:%M:%S %b %B %a %A %j %-d'))"
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %b %B %a %A %j %-d", 1_764_049_231),
            "2025-11-25 05:40:31 Nov November Tue Tuesday 329 25"
        );
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let env_out = {
            let mut env = Environment::new();
            env.add_filter("tojson", tojson);
            env.render_str(
                "{{ x | tojson }}|{{ x | tojson(indent=2) }}",
                minijinja::context! { x => Value::from_pairs([
                    ("a", Value::from(vec![Value::from(1), Value::from("é</>")])),
                    ("b", Value::from_pairs(Vec::<(&str, Value)>::new())),
                ]) },
            )
            .unwrap()
        };
        // json.dumps({"a": [1, "é</>"], "b": {}}, ensure_ascii=False) and with indent=2
        assert_eq!(
            env_out,
            "{\"a\": [1, \"é</>\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    \"é</>\"\n  ],\n  \"b\": {}\n}"
        );
    }

    #[test]
    fn raise_exception_is_told_apart() {
        let t = ChatTemplate::new(
            "{% if messages|length == 0 %}{{ raise_exception('empty!') }}{% endif %}{{ messages[0].x.y }}",
            vec![],
            "test",
        )
        .unwrap();
        match t.render(&Value::from(Vec::<Value>::new()), false) {
            Err(RenderError::Raised(m)) => assert_eq!(m, "empty!"),
            other => panic!("{other:?}"),
        }
        match t.render(&Value::from(vec![Value::from(1)]), false) {
            Err(RenderError::Failed(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}
