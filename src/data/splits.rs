//! Which splits a Hub dataset has and which files make each one — what
//! `datasets.get_dataset_split_names` and `load_dataset` resolve: the dataset card's YAML
//! `configs:` → `data_files:` patterns, else file-name conventions.

use globset::{GlobBuilder, GlobMatcher};
use serde_yaml::Value;

use crate::error::{Error, Result};
use crate::hub::RepoFile;

/// One split and its data files, in the order `datasets` reads them (sorted paths).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitFiles {
    pub name: String,
    pub files: Vec<RepoFile>,
}

/// The `---`-delimited YAML front matter of a dataset card, parsed.
pub fn front_matter(readme: &str) -> Result<Option<Value>> {
    let text = readme.strip_prefix('\u{feff}').unwrap_or(readme);
    let Some(rest) = text.strip_prefix("---") else {
        return Ok(None);
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    let Some(rest) = rest
        .strip_prefix('\n')
        .or_else(|| rest.strip_prefix("\r\n"))
    else {
        return Ok(None);
    };
    let end = rest.match_indices("\n---").map(|(i, _)| i).find(|&i| {
        let after = &rest[i + 4..];
        after.is_empty()
            || after.starts_with('\n')
            || after.starts_with("\r\n")
            || after.starts_with([' ', '\t'])
    });
    let yaml = match end {
        Some(i) => &rest[..i],
        None if rest.starts_with("---") => "",
        None => return Ok(None),
    };
    let v: Value = serde_yaml::from_str(yaml)
        .map_err(|e| Error::Dataset(format!("the dataset card's YAML header is invalid: {e}")))?;
    Ok(Some(v))
}

/// `(split, glob patterns)` pairs, in declaration order.
pub type SplitPatterns = Vec<(String, Vec<String>)>;

/// The split patterns of one config's `data_files`.
fn data_files_of(v: &Value) -> Result<SplitPatterns> {
    let patterns = |p: &Value| -> Result<Vec<String>> {
        match p {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Sequence(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::Dataset("data_files patterns must be strings".into()))
                })
                .collect(),
            _ => Err(Error::Dataset(
                "data_files 'path' must be a string or a list".into(),
            )),
        }
    };
    match v {
        Value::String(_) => Ok(vec![("train".into(), patterns(v)?)]),
        Value::Sequence(items) if items.iter().all(|i| i.is_string()) => {
            Ok(vec![("train".into(), patterns(v)?)])
        }
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let split = item
                    .get("split")
                    .and_then(Value::as_str)
                    .unwrap_or("train")
                    .to_string();
                let path = item.get("path").ok_or_else(|| {
                    Error::Dataset(format!(
                        "data_files entry for split '{split}' has no 'path'"
                    ))
                })?;
                Ok((split, patterns(path)?))
            })
            .collect(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, p)| {
                let split = k.as_str().ok_or_else(|| {
                    Error::Dataset("data_files split names must be strings".into())
                })?;
                Ok((split.to_string(), patterns(p)?))
            })
            .collect(),
        _ => Err(Error::Dataset(
            "data_files must be a string, a list or a mapping".into(),
        )),
    }
}

/// Picks the config (`subset`, else the one marked `default: true`, else the one named
/// `default`, else the only one) and returns its split patterns. `None` when the card
/// declares no configs.
pub fn config_patterns(
    card: Option<&Value>,
    subset: Option<&str>,
) -> Result<Option<SplitPatterns>> {
    let configs = match card.and_then(|c| c.get("configs")).and_then(Value::as_sequence) {
        Some(c) if !c.is_empty() => c,
        _ => {
            return match subset {
                Some(s) if s != "default" => Err(Error::Dataset(format!(
                    "this dataset declares no configs, so subset '{s}' does not exist; leave subset unset"
                ))),
                _ => Ok(None),
            }
        }
    };
    let name_of = |c: &Value| {
        c.get("config_name")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()
    };
    let names: Vec<String> = configs.iter().map(name_of).collect();
    let chosen = match subset {
        Some(s) => configs.iter().find(|c| name_of(c) == s).ok_or_else(|| {
            Error::Dataset(format!("subset '{s}' not found; available: {}", names.join(", ")))
        })?,
        None => configs
            .iter()
            .find(|c| c.get("default").and_then(Value::as_bool) == Some(true))
            .or_else(|| configs.iter().find(|c| name_of(c) == "default"))
            .or_else(|| (configs.len() == 1).then(|| &configs[0]))
            .ok_or_else(|| {
                Error::Dataset(format!(
                    "this dataset has several subsets and none is the default; pass subset= one of: {}",
                    names.join(", ")
                ))
            })?,
    };
    let df = chosen
        .get("data_files")
        .ok_or_else(|| Error::Dataset(format!("config '{}' has no data_files", name_of(chosen))))?;
    Ok(Some(data_files_of(df)?))
}

fn matcher(pattern: &str) -> Result<GlobMatcher> {
    let p = pattern.trim_start_matches("./");
    Ok(GlobBuilder::new(p)
        .literal_separator(true)
        .build()
        .map_err(|e| Error::Dataset(format!("bad data_files pattern '{pattern}': {e}")))?
        .compile_matcher())
}

/// Hidden files and `__`-prefixed ones are skipped unless a pattern names them, as
/// `datasets` does.
fn is_hidden(path: &str) -> bool {
    path.split('/')
        .any(|s| s.starts_with('.') || s.starts_with("__"))
}

/// Resolves split patterns against the repo's files.
pub fn resolve_patterns(
    patterns: &[(String, Vec<String>)],
    files: &[RepoFile],
) -> Result<Vec<SplitFiles>> {
    let mut out: Vec<SplitFiles> = Vec::new();
    for (split, pats) in patterns {
        let matchers = pats
            .iter()
            .map(|p| matcher(p))
            .collect::<Result<Vec<_>>>()?;
        let mut matched: Vec<RepoFile> = files
            .iter()
            .filter(|f| matchers.iter().any(|m| m.is_match(&f.path)))
            .filter(|f| !is_hidden(&f.path) || pats.iter().any(|p| is_hidden(p)))
            .cloned()
            .collect();
        if matched.is_empty() {
            return Err(Error::Dataset(format!(
                "split '{split}': no file matches {}",
                pats.join(", ")
            )));
        }
        matched.sort_by(|a, b| a.path.cmp(&b.path));
        match out.iter_mut().find(|s| &s.name == split) {
            Some(s) => s.files.extend(matched),
            None => out.push(SplitFiles {
                name: split.clone(),
                files: matched,
            }),
        }
    }
    Ok(out)
}

const DATA_EXTENSIONS: &[&str] = &[
    ".parquet", ".jsonl", ".json", ".csv", ".arrow", ".txt", ".tsv",
];

fn is_data_file(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    DATA_EXTENSIONS.iter().any(|e| p.ends_with(e)) && !is_hidden(path)
}

/// `data/{split}-NNNNN-of-NNNNN*` — the layout `push_to_hub` writes.
fn sharded_split_name(path: &str) -> Option<String> {
    let name = path.strip_prefix("data/")?;
    if name.contains('/') {
        return None;
    }
    let b = name.as_bytes();
    // find "-ddddd-of-ddddd"
    (1..b.len()).find_map(|i| {
        let rest = &b[i..];
        let ok = rest.len() >= 15
            && rest[0] == b'-'
            && rest[1..6].iter().all(u8::is_ascii_digit)
            && &rest[6..10] == b"-of-"
            && rest[10..15].iter().all(u8::is_ascii_digit);
        let split = &name[..i];
        (ok && split
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.'))
        .then(|| split.to_string())
    })
}

const KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// Whether `path` names `keyword` as a whole word (delimited by `-._ /` or digits), in a
/// file name or as a directory — `datasets`' keyword patterns.
fn mentions(path: &str, keyword: &str) -> bool {
    let delim = |c: Option<char>| c.is_none_or(|c| "-._ /".contains(c) || c.is_ascii_digit());
    let lower = path.to_ascii_lowercase();
    lower.match_indices(keyword).any(|(i, _)| {
        delim(lower[..i].chars().next_back()) && delim(lower[i + keyword.len()..].chars().next())
    })
}

/// Split discovery without YAML configs, in `datasets`' order of preference.
pub fn infer_splits(files: &[RepoFile]) -> Result<Vec<SplitFiles>> {
    let data: Vec<&RepoFile> = files.iter().filter(|f| is_data_file(&f.path)).collect();
    if data.is_empty() {
        return Err(Error::Dataset("the repository has no data files".into()));
    }
    let mut sharded: Vec<SplitFiles> = Vec::new();
    for f in &data {
        if let Some(s) = sharded_split_name(&f.path) {
            match sharded.iter_mut().find(|x| x.name == s) {
                Some(x) => x.files.push((*f).clone()),
                None => sharded.push(SplitFiles {
                    name: s,
                    files: vec![(*f).clone()],
                }),
            }
        }
    }
    let mut splits = if !sharded.is_empty() {
        // train, validation, test first, then the rest alphabetically.
        let rank = |n: &str| {
            KEYWORDS
                .iter()
                .position(|(k, _)| *k == n)
                .unwrap_or(KEYWORDS.len())
        };
        sharded.sort_by(|a, b| rank(&a.name).cmp(&rank(&b.name)).then(a.name.cmp(&b.name)));
        sharded
    } else {
        let mut v: Vec<SplitFiles> = KEYWORDS
            .iter()
            .filter_map(|(split, words)| {
                let files: Vec<RepoFile> = data
                    .iter()
                    .filter(|f| words.iter().any(|w| mentions(&f.path, w)))
                    .map(|f| (*f).clone())
                    .collect();
                (!files.is_empty()).then(|| SplitFiles {
                    name: split.to_string(),
                    files,
                })
            })
            .collect();
        if v.is_empty() {
            v.push(SplitFiles {
                name: "train".into(),
                files: data.iter().map(|f| (*f).clone()).collect(),
            });
        }
        v
    };
    for s in &mut splits {
        s.files.sort_by(|a, b| a.path.cmp(&b.path));
    }
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(p: &str) -> RepoFile {
        RepoFile {
            path: p.into(),
            size: 1,
            oid: String::new(),
            lfs_sha256: None,
        }
    }

    const CARD: &str = "---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_sft\n    path: data/train_sft-*\n  - split: test_sft\n    path: data/test_sft-*\n  - split: train_gen\n    path: data/train_gen-*\n  - split: test_gen\n    path: data/test_gen-*\n---\n# UltraChat\n";

    fn files() -> Vec<RepoFile> {
        vec![
            f("README.md"),
            f("data/train_sft-00001-of-00003-b.parquet"),
            f("data/train_sft-00000-of-00003-a.parquet"),
            f("data/train_sft-00002-of-00003-c.parquet"),
            f("data/test_sft-00000-of-00001-d.parquet"),
            f("data/train_gen-00000-of-00001-e.parquet"),
            f("data/test_gen-00000-of-00001-f.parquet"),
            f("data/.hidden-train_sft-x.parquet"),
        ]
    }

    #[test]
    fn yaml_configs() {
        let card = front_matter(CARD).unwrap();
        let pats = config_patterns(card.as_ref(), None).unwrap().unwrap();
        let splits = resolve_patterns(&pats, &files()).unwrap();
        let names: Vec<_> = splits.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["train_sft", "test_sft", "train_gen", "test_gen"]);
        let train: Vec<_> = splits[0].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            train,
            [
                "data/train_sft-00000-of-00003-a.parquet",
                "data/train_sft-00001-of-00003-b.parquet",
                "data/train_sft-00002-of-00003-c.parquet"
            ]
        );
        assert!(matches!(
            config_patterns(card.as_ref(), Some("nope")),
            Err(Error::Dataset(_))
        ));
    }

    #[test]
    fn data_files_shapes() {
        let card = front_matter("---\nconfigs:\n- config_name: a\n  data_files: x/*.parquet\n- config_name: b\n  data_files:\n    train: t/*.parquet\n    test: [u/*.parquet]\n---\n").unwrap();
        assert!(
            config_patterns(card.as_ref(), None).is_err(),
            "no default among two configs"
        );
        let a = config_patterns(card.as_ref(), Some("a")).unwrap().unwrap();
        assert_eq!(
            a,
            vec![("train".to_string(), vec!["x/*.parquet".to_string()])]
        );
        let b = config_patterns(card.as_ref(), Some("b")).unwrap().unwrap();
        assert_eq!(b[1], ("test".to_string(), vec!["u/*.parquet".to_string()]));
        assert_eq!(front_matter("# no yaml").unwrap(), None);
    }

    #[test]
    fn inferred_from_file_names() {
        let splits = infer_splits(&files()).unwrap();
        let names: Vec<_> = splits.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["test_gen", "test_sft", "train_gen", "train_sft"]);
        let kw = infer_splits(&[
            f("train.parquet"),
            f("dev.parquet"),
            f("test.parquet"),
            f("contest.parquet"),
        ])
        .unwrap();
        let names: Vec<_> = kw
            .iter()
            .map(|s| (s.name.as_str(), s.files.len()))
            .collect();
        assert_eq!(names, [("train", 1), ("validation", 1), ("test", 1)]);
        let single = infer_splits(&[f("stuff.parquet")]).unwrap();
        assert_eq!(single[0].name, "train");
    }
}
