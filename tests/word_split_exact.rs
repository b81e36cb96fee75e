//! The word split ferrotune adds to SentencePiece-style BPE tokenizers changes no token id
//! and no offset: random texts encode identically with and without it.

use std::path::Path;
use std::sync::OnceLock;

use ferrotune::chat::compat::effective_tokenizer_json;
use ferrotune::chat::files::TokenizerFiles;
use ferrotune::chat::tokenizer::Backend;
use proptest::prelude::*;
use tokenizers::Tokenizer;

fn pair() -> Option<&'static (Backend, Tokenizer)> {
    static PAIR: OnceLock<Option<(Backend, Tokenizer)>> = OnceLock::new();
    PAIR.get_or_init(load_pair).as_ref()
}

fn load_pair() -> Option<(Backend, Tokenizer)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/phi3-tokenizer");
    let files = TokenizerFiles::from_dir(&dir).ok()?;
    let (json, _) = effective_tokenizer_json(&files);
    assert_eq!(
        json["pre_tokenizer"]["type"], "FerrotuneWordSplit",
        "the split applies to Phi-3"
    );
    let mut plain = json.clone();
    plain["pre_tokenizer"] = json["pre_tokenizer"]["inner"].clone();
    let with = Backend::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
    let without = Tokenizer::from_bytes(serde_json::to_vec(&plain).unwrap()).unwrap();
    Some((with, without))
}

fn text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        " ",
        "  ",
        "   ",
        "\n",
        "\t",
        "\u{2581}",
        "\u{2581}\u{2581}",
        "a",
        "the",
        "Hello",
        "world",
        "ing",
        "é",
        "中文",
        "😀",
        "👩‍👩‍👧",
        "<|user|>",
        "<|end|>",
        "</s>",
        "<s>",
        "12345",
        "{}",
        ".",
        "\u{0}",
        "\u{2028}",
        "Ǆ",
        "x\u{301}",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn split_changes_no_id_or_offset(s in text()) {
        let Some((with, without)) = pair() else { return Ok(()) };
        let a = with.encode(s.as_str(), false).unwrap();
        let b = without.encode(s.as_str(), false).unwrap();
        prop_assert_eq!(a.get_ids(), b.get_ids());
        prop_assert_eq!(a.get_offsets(), b.get_offsets());
    }
}
