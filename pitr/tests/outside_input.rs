//! Everything pitr parses comes from outside: object keys and history files from the store,
//! LSNs and times from the command line, backup facts from manifests. Each parser is total:
//! any input gives a value or an error, never a panic.

use pitr::{Lsn, TimelinePath, WalFile};
use proptest::prelude::*;

#[test]
fn a_24_byte_name_with_multi_byte_characters_is_not_a_wal_name() {
    // 24 bytes each, with byte 8 or 16 inside a character: slicing there panicked.
    for name in [
        "0000000€000000000000000A",
        "é0000000100000000000000",
        "00000001000000000000000€",
    ] {
        assert!(WalFile::parse(name).is_err(), "{name}");
        assert!(WalFile::parse(&format!("{name}.partial")).is_err());
        assert!(WalFile::parse(&format!("{name}.00000028.backup")).is_err());
    }
}

proptest! {
    #[test]
    fn any_file_name_is_a_wal_file_or_an_error(name in "\\PC{0,40}") {
        if let Ok(file) = WalFile::parse(&name) {
            prop_assert_eq!(file.name(), name);
        }
    }

    #[test]
    fn names_made_of_hex_and_wide_characters_never_panic(
        name in "[0-9A-F€é🙂]{1,24}(\\.partial|\\.history|\\.[0-9A-F]{8}\\.backup)?",
    ) {
        let _ = WalFile::parse(&name);
    }

    #[test]
    fn any_history_file_is_a_path_or_an_error(timeline in any::<u32>(), text in "\\PC{0,300}") {
        let _ = TimelinePath::parse(timeline, &text);
    }

    #[test]
    fn history_lines_of_random_shapes_never_panic(
        lines in proptest::collection::vec(("[0-9]{0,12}", "[0-9A-F/é]{0,20}", "\\PC{0,20}"), 0..6),
    ) {
        let text: String = lines
            .iter()
            .map(|(tl, lsn, reason)| format!("{tl}\t{lsn}\t{reason}\n"))
            .collect();
        let _ = TimelinePath::parse(7, &text);
    }

    #[test]
    fn any_text_is_an_lsn_or_an_error(text in "\\PC{0,30}") {
        let _ = text.parse::<Lsn>();
    }

    #[test]
    fn any_text_is_a_time_or_an_error(text in "\\PC{0,40}") {
        let _ = pitr::target::parse_time(&text);
    }
}
