//! Channel names (SPEC §7): what a name may be, and the channel a relay without a channels file
//! serves. The configuration checks names against these rules, the routes take them from paths
//! and the store keys every job by one, so they live here, below all three.

/// The channel of a single-channel relay, and of every job stored before channels existed.
pub const DEFAULT_CHANNEL: &str = "default";

/// Whether `name` is a channel's name (SPEC §7): 1 to 32 of `a-z 0-9 -`, starting with a
/// letter or a digit.
pub fn is_channel_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_those_spec_7_allows() {
        for good in ["default", "shoes", "a", "0", "eu-west-2", &"x".repeat(32)] {
            assert!(is_channel_name(good), "{good}");
        }
        for bad in ["", "-shoes", "Shoes", "shoes_2", "shö", "a b", "a/b", &"x".repeat(33)] {
            assert!(!is_channel_name(bad), "{bad}");
        }
    }
}
