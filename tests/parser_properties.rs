//! Property tests at the parser boundaries: whatever a server or a dataset card sends,
//! these functions return a value or an error — never a panic — and what they accept is safe.

use ferrotune::data::select::SplitPc;
use ferrotune::data::splits::front_matter;
use ferrotune::hub::cache::{check_repo_path, normalize_etag};
use ferrotune::hub::http::{join_location, origin};
use proptest::prelude::*;
use std::path::{Component, Path};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn dataset_card_parsing_never_panics(s in any::<String>(), yaml in "[-a-z:\\[\\]{}\n '\"|>*&!%@`]{0,200}") {
        let _ = front_matter(&s);
        let _ = front_matter(&format!("---\n{yaml}\n---\n# card"));
    }

    #[test]
    fn accepted_repo_paths_stay_inside_the_snapshot(p in "[a-zA-Z0-9._/\\\\:-]{0,40}") {
        if check_repo_path(&p).is_ok() {
            let path = Path::new(&p);
            prop_assert!(path.is_relative());
            prop_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
            prop_assert!(!p.contains('\\') && !p.split('/').any(|s| s == ".." || s.is_empty()));
        }
    }

    #[test]
    fn accepted_etags_are_hex_digests(e in any::<String>()) {
        if let Ok(tag) = normalize_etag(&e) {
            prop_assert!(tag.len() == 40 || tag.len() == 64);
            prop_assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn url_helpers_never_panic(a in any::<String>(), b in any::<String>()) {
        let _ = origin(&a);
        let _ = join_location(&a, &b);
        let _ = join_location("http://127.0.0.1:1/datasets/x/resolve/main/f", &b);
    }

    #[test]
    fn row_counts_match_pythons_round(pc in 1u32..=100, n in 0u64..10_000_000) {
        let got = SplitPc::Int(pc).rows_of(n);
        // Python: round(pc * n / 100) with ties to even, computed here in exact integers.
        let num = pc as u64 * n;
        let (q, r) = (num / 100, num % 100);
        let want = if r > 50 || (r == 50 && q % 2 == 1) { q + 1 } else { q };
        prop_assert_eq!(got, want);
        prop_assert!(got <= n);
    }
}
