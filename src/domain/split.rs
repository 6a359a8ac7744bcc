//! Splitting a long text into parts JoinChat accepts (≤ 640 characters each, SPEC §3.3).
//!
//! Each cut goes at the best boundary the part can end on: a paragraph break, else a line
//! break, else a sentence end, else a space, else between two grapheme clusters (so an emoji
//! or an accented letter is never torn apart), else between two characters. Among boundaries of
//! the best kind the last one is taken, so parts stay as long as allowed. The whitespace at a
//! cut is dropped; everything else is kept, in order.

use unicode_segmentation::UnicodeSegmentation;

/// The longest text JoinChat takes in one message (its Send API documentation: 640 characters
/// for a `text` or the text of a `button` template).
pub const JOINCHAT_TEXT_LIMIT: usize = 640;

/// Splits `text` into parts of at most `max_chars` characters. The parts are slices of `text`,
/// in order; what lies between two of them is whitespace.
pub fn split_text(text: &str, max_chars: usize) -> Vec<&str> {
    assert!(max_chars > 0, "a part must hold at least one character");
    if text.chars().count() <= max_chars {
        return vec![text];
    }
    // Whitespace at the ends of a text that must be cut anyway is treated like whitespace at a
    // cut; otherwise a text opening with a long blank run could yield a blank part.
    let mut rest = text.trim();
    let mut parts = Vec::new();
    while rest.chars().nth(max_chars).is_some() {
        let cut = best_cut(rest, max_chars);
        parts.push(&rest[..cut.part_end]);
        rest = &rest[cut.next_start..];
    }
    if !rest.is_empty() {
        parts.push(rest);
    }
    parts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Boundary {
    Space,
    SentenceEnd,
    LineBreak,
    ParagraphBreak,
}

/// Byte offsets: the part is `rest[..part_end]`, the next part starts at `rest[next_start..]`.
#[derive(Debug, Clone, Copy)]
struct Cut {
    part_end: usize,
    next_start: usize,
}

/// A maximal run of whitespace that began at character position `start_pos`.
struct WhitespaceRun {
    start_byte: usize,
    start_pos: usize,
    newlines: usize,
    after_sentence_end: bool,
}

impl WhitespaceRun {
    fn boundary(&self) -> Boundary {
        match self.newlines {
            0 if self.after_sentence_end => Boundary::SentenceEnd,
            0 => Boundary::Space,
            1 => Boundary::LineBreak,
            _ => Boundary::ParagraphBreak,
        }
    }
}

/// Finds where to end the first part of `rest`, which starts with a non-whitespace character
/// and is longer than `max_chars`.
fn best_cut(rest: &str, max_chars: usize) -> Cut {
    let mut best: Option<(Boundary, Cut)> = None;
    // Scanning forward, a later boundary of the same kind replaces an earlier one.
    let mut offer = |boundary: Boundary, cut: Cut| {
        if best.is_none_or(|(kind, _)| boundary >= kind) {
            best = Some((boundary, cut));
        }
    };

    let mut run: Option<WhitespaceRun> = None;
    let mut sentence_ended = false;
    let mut ended_by_cjk_stop = false;

    for (pos, (byte, c)) in rest.char_indices().enumerate() {
        if c.is_whitespace() {
            let run = match run.as_mut() {
                Some(run) => run,
                // A run starting past the limit would make the part too long.
                None if pos > max_chars => break,
                None => run.insert(WhitespaceRun {
                    start_byte: byte,
                    start_pos: pos,
                    newlines: 0,
                    after_sentence_end: sentence_ended,
                }),
            };
            match c {
                '\n' | '\u{2028}' => run.newlines += 1,
                '\u{2029}' => run.newlines += 2,
                _ => {}
            }
            continue;
        }

        if let Some(run) = run.take() {
            if run.start_pos > 0 {
                offer(run.boundary(), Cut { part_end: run.start_byte, next_start: byte });
            }
        } else if ended_by_cjk_stop && !is_closing_mark(c) && pos <= max_chars {
            // CJK text ends sentences without a following space: cut right after the stop.
            offer(Boundary::SentenceEnd, Cut { part_end: byte, next_start: byte });
        }
        if pos >= max_chars {
            break;
        }

        if is_sentence_stop(c) {
            sentence_ended = true;
            ended_by_cjk_stop = is_cjk_sentence_stop(c);
        } else if !(sentence_ended && is_closing_mark(c)) {
            sentence_ended = false;
            ended_by_cjk_stop = false;
        }
    }

    match best {
        Some((_, cut)) => cut,
        None => hard_cut(rest, max_chars),
    }
}

/// No boundary in reach: cut at the last grapheme cluster boundary that fits, or, for a
/// single cluster longer than the limit, between two characters.
fn hard_cut(rest: &str, max_chars: usize) -> Cut {
    let mut chars = 0;
    let mut end = 0;
    for grapheme in rest.graphemes(true) {
        chars += grapheme.chars().count();
        if chars > max_chars {
            break;
        }
        end += grapheme.len();
    }
    if end == 0 {
        end = rest.char_indices().nth(max_chars).map_or(rest.len(), |(byte, _)| byte);
    }
    Cut { part_end: end, next_start: end }
}

fn is_sentence_stop(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '‼' | '⁇') || is_cjk_sentence_stop(c)
}

fn is_cjk_sentence_stop(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '｡')
}

/// Marks that may close a sentence after its stop: `He said "yes."` ends after the quote.
fn is_closing_mark(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '}' | '”' | '’' | '»' | '›' | '」' | '』' | '）' | '】')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = JOINCHAT_TEXT_LIMIT;

    fn words(n: usize) -> String {
        (0..n).map(|i| format!("w{}", i % 10)).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn text_within_the_limit_is_one_untouched_part() {
        let text = format!("  {}\n", "a".repeat(MAX - 3));
        assert_eq!(split_text(&text, MAX), vec![text.as_str()]);
        assert_eq!(split_text("x", MAX), vec!["x"]);
    }

    #[test]
    fn text_one_over_the_limit_becomes_two_parts() {
        let text = "a".repeat(MAX + 1);
        let parts = split_text(&text, MAX);
        assert_eq!(parts, vec!["a".repeat(MAX).as_str(), "a"]);
    }

    #[test]
    fn a_paragraph_break_wins_over_later_line_breaks_and_spaces() {
        let first = format!("{}.", words(60)); // about 180 characters
        let second = format!("{}\n{}", words(100), words(100));
        let text = format!("{first}\n\n{second}");
        let parts = split_text(&text, MAX);
        assert_eq!(parts[0], first);
        assert!(parts[1].starts_with("w0 w1"));
    }

    #[test]
    fn the_last_paragraph_break_in_reach_is_taken() {
        let text = format!("{}\n\n{}\n\n{}", "a".repeat(100), "b".repeat(300), "c".repeat(400));
        let parts = split_text(&text, MAX);
        assert_eq!(parts, vec![format!("{}\n\n{}", "a".repeat(100), "b".repeat(300)), "c".repeat(400)]);
    }

    #[test]
    fn a_line_break_wins_over_sentence_ends() {
        let text = format!("{}\n{}. {}", "a".repeat(300), "b".repeat(200), "c".repeat(300));
        let parts = split_text(&text, MAX);
        assert_eq!(parts[0], "a".repeat(300));
        assert_eq!(parts[1], format!("{}. {}", "b".repeat(200), "c".repeat(300)));
    }

    #[test]
    fn a_sentence_end_wins_over_spaces() {
        let text = format!("{}! {} {}", "a".repeat(400), "b".repeat(200), "c".repeat(300));
        let parts = split_text(&text, MAX);
        assert_eq!(parts[0], format!("{}!", "a".repeat(400)));
    }

    #[test]
    fn a_closing_quote_stays_with_its_sentence() {
        let text = format!("She said \"{}.\" {} {}", "a".repeat(400), "b".repeat(200), "c".repeat(300));
        let parts = split_text(&text, MAX);
        assert!(parts[0].ends_with(".\""), "{}", parts[0]);
    }

    #[test]
    fn a_decimal_point_is_not_a_sentence_end() {
        // "3.14" ends in a digit: the cut falls at the last space in reach, not after "3.".
        let text = format!("{}. {} 3.14 {}", "a".repeat(100), "b".repeat(200), "c".repeat(400));
        let parts = split_text(&text, MAX);
        assert_eq!(parts[0], format!("{}.", "a".repeat(100)));
        let text = format!("{} 3.14 {}", "a".repeat(300), "b".repeat(400));
        let parts = split_text(&text, MAX);
        assert_eq!(parts[0], format!("{} 3.14", "a".repeat(300)));
    }

    #[test]
    fn cjk_sentences_are_cut_after_the_full_stop() {
        let text = format!("{}。{}", "字".repeat(500), "文".repeat(500));
        let parts = split_text(&text, MAX);
        assert_eq!(parts, vec![format!("{}。", "字".repeat(500)), "文".repeat(500)]);
    }

    #[test]
    fn a_space_is_used_when_nothing_better_is_in_reach() {
        let text = format!("{} {} {}", "a".repeat(300), "b".repeat(300), "c".repeat(300));
        let parts = split_text(&text, MAX);
        assert_eq!(parts, vec![format!("{} {}", "a".repeat(300), "b".repeat(300)), "c".repeat(300)]);
    }

    #[test]
    fn whitespace_just_after_the_limit_is_still_a_boundary() {
        let text = format!("{} {}", "a".repeat(MAX), "b".repeat(10));
        assert_eq!(split_text(&text, MAX), vec!["a".repeat(MAX), "b".repeat(10)]);
    }

    #[test]
    fn a_boundary_just_past_the_limit_is_out_of_reach() {
        let text = format!("{} {}", "a".repeat(MAX + 1), "b".repeat(10));
        let parts = split_text(&text, MAX);
        assert_eq!(parts, vec!["a".repeat(MAX), format!("a {}", "b".repeat(10))]);
    }

    #[test]
    fn a_hard_cut_never_tears_an_emoji_sequence() {
        // A family emoji is seven scalar values forming one grapheme cluster.
        let family = "👨\u{200d}👩\u{200d}👧\u{200d}👦";
        let text = format!("{}{family}{}", "a".repeat(MAX - 3), "b".repeat(10));
        let parts = split_text(&text, MAX);
        assert_eq!(parts, vec!["a".repeat(MAX - 3), format!("{family}{}", "b".repeat(10))]);
    }

    #[test]
    fn a_hard_cut_never_separates_a_letter_from_its_accent() {
        let text = format!("{}e\u{301}{}", "a".repeat(MAX - 1), "b".repeat(5));
        let parts = split_text(&text, MAX);
        assert_eq!(parts[0], "a".repeat(MAX - 1));
        assert!(parts[1].starts_with("e\u{301}"));
    }

    #[test]
    fn the_longest_bonychat_text_fits_in_eleven_parts() {
        let text = "a".repeat(7000);
        let parts = split_text(&text, MAX);
        assert_eq!(parts.len(), 11);
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn whitespace_around_a_long_text_is_dropped_like_whitespace_at_a_cut() {
        let text = format!("{}{}", " ".repeat(MAX + 5), "hello");
        assert_eq!(split_text(&text, MAX), vec!["hello"]);
    }

    /// Where the parts sit in `text`, as byte ranges. Panics if a part is not a slice of it.
    fn offsets(text: &str, parts: &[&str]) -> Vec<(usize, usize)> {
        let base = text.as_ptr() as usize;
        parts
            .iter()
            .map(|part| {
                let start = part.as_ptr() as usize - base;
                assert!(start + part.len() <= text.len(), "part lies outside the text");
                (start, start + part.len())
            })
            .collect()
    }

    /// Independent, slow oracle: the kind of the best boundary a first part could end on, and
    /// the length of the longest part ending on one of that kind.
    fn best_available(chars: &[char], max: usize) -> Option<(Boundary, usize)> {
        let mut best = None;
        for s in 1..=max.min(chars.len() - 1) {
            let mut k = s;
            while k > 0 && is_closing_mark(chars[k - 1]) {
                k -= 1;
            }
            let after_stop = k > 0 && is_sentence_stop(chars[k - 1]);
            let boundary = if chars[s].is_whitespace() && !chars[s - 1].is_whitespace() {
                let run: Vec<char> = chars[s..].iter().take_while(|c| c.is_whitespace()).copied().collect();
                Some(kind_of(&run.iter().collect::<String>(), after_stop))
            } else if !chars[s].is_whitespace()
                && !is_closing_mark(chars[s])
                && k > 0
                && is_cjk_sentence_stop(chars[k - 1])
            {
                Some(Boundary::SentenceEnd)
            } else {
                None
            };
            if let Some(kind) = boundary
                && best.is_none_or(|(best_kind, _)| kind >= best_kind)
            {
                best = Some((kind, s));
            }
        }
        best
    }

    fn kind_of(gap: &str, after_stop: bool) -> Boundary {
        let newlines = gap.chars().filter(|&c| c == '\n' || c == '\u{2028}').count()
            + 2 * gap.chars().filter(|&c| c == '\u{2029}').count();
        match newlines {
            0 if after_stop => Boundary::SentenceEnd,
            0 => Boundary::Space,
            1 => Boundary::LineBreak,
            _ => Boundary::ParagraphBreak,
        }
    }

    /// The kind of boundary a cut used, from the part before it and the whitespace dropped.
    fn boundary_at(gap: &str, before: &str) -> Option<Boundary> {
        let last = before.trim_end_matches(is_closing_mark).chars().last();
        if gap.is_empty() {
            // Zero-width: a CJK full stop, or a hard cut.
            return last.filter(|&c| is_cjk_sentence_stop(c)).map(|_| Boundary::SentenceEnd);
        }
        Some(kind_of(gap, last.is_some_and(is_sentence_stop)))
    }

    /// Text made of the pieces that matter to the splitter, in random proportions.
    fn chat_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => "[a-zA-Z0-9]{1,12}",
            2 => Just(" ".to_owned()),
            1 => Just(". ".to_owned()),
            1 => Just("! ".to_owned()),
            1 => Just("\n".to_owned()),
            1 => Just("\n\n".to_owned()),
            1 => Just("\r\n".to_owned()),
            1 => "[日本語の文字]{1,20}",
            1 => Just("。".to_owned()),
            1 => Just("\"".to_owned()),
            1 => Just("👨\u{200d}👩\u{200d}👧".to_owned()),
            1 => Just("e\u{301}".to_owned()),
            1 => "\\PC{1,30}",
        ];
        prop::collection::vec(piece, 0..400).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn parts_fit_keep_order_and_lose_nothing_but_whitespace_at_cuts(text in chat_text()) {
            prop_assume!(!text.is_empty());
            let parts = split_text(&text, MAX);

            for part in &parts {
                prop_assert!(part.chars().count() <= MAX);
                prop_assert!(!part.is_empty());
            }
            let ranges = offsets(&text, &parts);
            let mut previous_end = 0;
            for &(start, end) in &ranges {
                prop_assert!(start >= previous_end, "parts overlap or are out of order");
                prop_assert!(text[previous_end..start].chars().all(char::is_whitespace),
                    "lost non-whitespace between parts: {:?}", &text[previous_end..start]);
                previous_end = end;
            }
            prop_assert!(text[previous_end..].chars().all(char::is_whitespace));
        }

        #[test]
        fn every_cut_is_at_the_best_boundary_in_reach(text in chat_text()) {
            let parts = split_text(&text, MAX);
            let ranges = offsets(&text, &parts);
            for pair in ranges.windows(2) {
                let (start, end) = pair[0];
                let next_start = pair[1].0;
                let window: Vec<char> = text[start..].chars().collect();
                let chosen = boundary_at(&text[end..next_start], &text[start..end]);
                let available = best_available(&window, MAX);
                let part_len = text[start..end].chars().count();
                prop_assert_eq!(chosen.map(|kind| (kind, part_len)), available, "cut after {:?}", &text[start..end]);
            }
        }

        #[test]
        fn hard_cuts_fall_between_grapheme_clusters(text in "[a-z\u{301}\u{200d}👩]{0,2000}") {
            let parts = split_text(&text, MAX);
            let ranges = offsets(&text, &parts);
            let boundaries: Vec<usize> = text.grapheme_indices(true).map(|(i, _)| i).collect();
            for &(start, end) in &ranges {
                // One cluster longer than the limit is the only reason to cut inside one.
                let fits = text[start..].graphemes(true).next().is_none_or(|g| g.chars().count() <= MAX);
                if fits {
                    prop_assert!(boundaries.contains(&start) || start == text.len());
                    prop_assert!(boundaries.contains(&end) || end == text.len());
                }
            }
        }
    }
}
