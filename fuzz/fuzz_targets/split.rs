//! SPEC §3.3 for any text: parts of 1..=max characters, in order, and nothing lost but the
//! whitespace at the cuts.

#![no_main]

use bonychat_relay::domain::split::{JOINCHAT_TEXT_LIMIT, split_text};
use libfuzzer_sys::fuzz_target;
use unicode_segmentation::UnicodeSegmentation;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    // A small limit makes many cuts out of short inputs, which libFuzzer explores far faster
    // than texts over 640 characters; the real limit is checked on every input as well.
    check(&text, usize::from(first % 64) + 1);
    check(&text, JOINCHAT_TEXT_LIMIT);
});

fn check(text: &str, max: usize) {
    let parts = split_text(text, max);
    if text.chars().count() <= max {
        assert_eq!(parts, [text], "a text within the limit is one untouched part");
        return;
    }
    let mut end_of_previous = 0;
    for (index, part) in parts.iter().enumerate() {
        let chars = part.chars().count();
        assert!((1..=max).contains(&chars), "part {index} has {chars} characters (max {max})");
        assert_eq!(part.trim(), *part, "part {index} keeps whitespace of a cut: {part:?}");
        // Parts are slices of `text`: their offsets show the order and what lies between them.
        let start = part.as_ptr() as usize - text.as_ptr() as usize;
        assert!(start >= end_of_previous, "part {index} is out of order");
        let gap = &text[end_of_previous..start];
        assert!(gap.chars().all(char::is_whitespace), "part {index}: non-whitespace {gap:?} was dropped");
        if index > 0 && gap.is_empty() {
            check_cut_without_whitespace(text, parts[index - 1], start, max);
        }
        end_of_previous = start + part.len();
    }
    let tail = &text[end_of_previous..];
    assert!(tail.chars().all(char::is_whitespace), "the end {tail:?} was dropped");
}

/// A cut between two non-blank characters follows a CJK full stop, or else does not tear a
/// grapheme cluster apart unless a single cluster is longer than the limit.
fn check_cut_without_whitespace(text: &str, previous: &str, cut: usize, max: usize) {
    let before = previous.chars().next_back().expect("parts are not empty");
    let after_cjk_stop = previous
        .trim_end_matches(['"', '\'', ')', ']', '}', '”', '’', '»', '›', '」', '』', '）', '】'])
        .ends_with(['。', '！', '？', '｡']);
    if after_cjk_stop {
        return;
    }
    let start = previous.as_ptr() as usize - text.as_ptr() as usize;
    let span = &text[start..];
    let mut boundary = 0;
    for grapheme in span.graphemes(true) {
        if boundary == cut - start {
            return;
        }
        if boundary > cut - start {
            break;
        }
        if boundary == 0 && grapheme.chars().count() > max {
            return;
        }
        boundary += grapheme.len();
    }
    panic!("a cut after {before:?} tears a grapheme cluster apart at byte {cut}");
}
