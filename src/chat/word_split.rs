//! A pre-tokenizer step that cuts text before each run of `▁` (SentencePiece's word
//! marker), used where it provably leaves every token id unchanged (see
//! [`super::compat::split_words_where_exact`]).
//!
//! Written here rather than as the library's regex `Split` because that step goes
//! through Oniguruma with an allocation per match, which cost more than it saved; a run of
//! one character needs no regex.

use serde::{Deserialize, Serialize};
use tokenizers::pattern::Pattern;
use tokenizers::{
    Offsets, PreTokenizedString, PreTokenizer, PreTokenizerWrapper, SplitDelimiterBehavior,
};

/// The `type` tag of [`WordSplit`] in tokenizer JSON.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum WordSplitTag {
    FerrotuneWordSplit,
}

/// Runs `inner` (if any), then cuts every piece before each run of `▁`, the run staying
/// with the word that follows it (`"a▁▁b▁c"` → `"a"`, `"▁▁b"`, `"▁c"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WordSplit {
    #[serde(rename = "type")]
    pub tag: WordSplitTag,
    pub inner: Option<PreTokenizerWrapper>,
}

/// The pre-tokenizer of a [`super::tokenizer::ChatTokenizer`]: the library's, or ours.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChatPreTokenizer {
    WordSplit(WordSplit),
    Builtin(PreTokenizerWrapper),
}

struct SpaceRuns;

const SPACE: char = '\u{2581}';

impl Pattern for SpaceRuns {
    fn find_matches(&self, inside: &str) -> tokenizers::Result<Vec<(Offsets, bool)>> {
        let mut out = Vec::new();
        let mut last = 0;
        let mut run_start: Option<usize> = None;
        for (i, c) in inside.char_indices() {
            match (c == SPACE, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(s)) => {
                    if s > last {
                        out.push(((last, s), false));
                    }
                    out.push(((s, i), true));
                    last = i;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            if s > last {
                out.push(((last, s), false));
            }
            out.push(((s, inside.len()), true));
            last = inside.len();
        }
        if last < inside.len() || out.is_empty() {
            out.push(((last, inside.len()), false));
        }
        Ok(out)
    }
}

impl PreTokenizer for ChatPreTokenizer {
    fn pre_tokenize(&self, pretok: &mut PreTokenizedString) -> tokenizers::Result<()> {
        match self {
            ChatPreTokenizer::Builtin(p) => p.pre_tokenize(pretok),
            ChatPreTokenizer::WordSplit(w) => {
                if let Some(inner) = &w.inner {
                    inner.pre_tokenize(pretok)?;
                }
                pretok.split(|_, s| s.split(SpaceRuns, SplitDelimiterBehavior::MergedWithNext))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(s: &str) -> Vec<(String, bool)> {
        SpaceRuns
            .find_matches(s)
            .unwrap()
            .into_iter()
            .map(|((a, b), m)| (s[a..b].to_string(), m))
            .collect()
    }

    #[test]
    fn runs_of_the_marker_are_matches_covering_the_whole_text() {
        assert_eq!(
            pieces("a▁▁b▁c"),
            vec![
                ("a".into(), false),
                ("▁▁".into(), true),
                ("b".into(), false),
                ("▁".into(), true),
                ("c".into(), false)
            ]
        );
        assert_eq!(
            pieces("▁x▁"),
            vec![("▁".into(), true), ("x".into(), false), ("▁".into(), true)]
        );
        assert_eq!(pieces(""), vec![("".into(), false)]);
        assert_eq!(pieces("abc"), vec![("abc".into(), false)]);
    }
}
