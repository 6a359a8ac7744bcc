//! Character counting and truncation. "Characters" are Unicode scalar values (SPEC §3.1).

use std::borrow::Cow;

pub fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// Keeps `s` when it has at most `max` characters; otherwise keeps `max - 1` and appends `…`.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    debug_assert!(max > 0);
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some(_) => {
            let (cut, _) = s.char_indices().nth(max - 1).expect("s has more than max chars");
            Cow::Owned(format!("{}…", &s[..cut]))
        }
    }
}

/// Collapses every whitespace run to one space and trims the ends, for comparing texts that
/// may have been re-wrapped on the way (Messenger does not echo line endings byte for byte).
pub fn normalize_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_is_normalized_for_comparison() {
        assert_eq!(normalize_whitespace("  Hello\r\n  World\t"), "Hello World");
    }

    #[test]
    fn truncation_keeps_short_text_untouched() {
        assert_eq!(truncate("Yes", 20), "Yes");
        assert_eq!(truncate("12345678901234567890", 20), "12345678901234567890");
    }

    #[test]
    fn truncation_keeps_n_minus_one_characters_and_an_ellipsis() {
        let cut = truncate("123456789012345678901", 20);
        assert_eq!(cut, "1234567890123456789…");
        assert_eq!(char_len(&cut), 20);
    }

    #[test]
    fn truncation_counts_scalar_values_not_bytes() {
        let cut = truncate("ééééé", 3);
        assert_eq!(cut, "éé…");
        assert_eq!(truncate("日本語のテキスト", 4), "日本語…");
    }
}
