use std::fmt;

/// A value that must never reach a log line, an error message or `Debug` output.
/// Reading it takes an explicit [`Secret::expose`], which is easy to find in review.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A secret and, during a rotation, the value it replaces (SPEC §1, "Rotation"): `<NAME>` and
/// `<NAME>_PREVIOUS`, or `<key>_*` and `<key>_previous_*` in the channels file. Both are live:
/// checks accept either, and what the relay sends goes with the other when the upstream
/// refuses one. The previous value is dropped by the operator once the counter
/// `bonychat_relay_secret_matches_total{value="previous"}` stops moving.
#[derive(Clone, PartialEq, Eq)]
pub struct Rotating {
    pub current: Secret,
    pub previous: Option<Secret>,
}

impl Rotating {
    /// A secret outside a rotation: the current value alone.
    pub fn new(current: Secret) -> Self {
        Self { current, previous: None }
    }

    pub fn with_previous(current: Secret, previous: Option<Secret>) -> Self {
        Self { current, previous }
    }

    /// The value of `which`, when the secret has one.
    pub fn value(&self, which: SecretValue) -> Option<&Secret> {
        match which {
            SecretValue::Current => Some(&self.current),
            SecretValue::Previous => self.previous.as_ref(),
        }
    }

    /// Every live value, the current one first.
    pub fn values(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }

    /// Whether both values are the same: a rotation set up with the new value twice (or the old
    /// one twice), which would keep nothing of the other alive. Worth a warning.
    pub fn previous_is_current(&self) -> bool {
        self.previous.as_ref() == Some(&self.current)
    }

    /// Whether one of these values is one of `other`'s.
    pub fn shares_a_value_with(&self, other: &Self) -> bool {
        self.values().any(|mine| other.values().any(|theirs| mine == theirs))
    }
}

impl fmt::Debug for Rotating {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rotating").field("current", &self.current).field("previous", &self.previous).finish()
    }
}

/// Which of a rotating secret's two values: the `value` label of the rotation counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretValue {
    Current,
    Previous,
}

impl SecretValue {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Previous => "previous",
        }
    }

    /// The other value.
    pub fn other(self) -> Self {
        match self {
            Self::Current => Self::Previous,
            Self::Previous => Self::Current,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
        assert_eq!(format!("{:?}", Some(secret)), "Some(Secret([redacted]))");
    }

    #[test]
    fn debug_output_of_a_rotation_hides_both_values() {
        let rotating = Rotating::with_previous(Secret::new("new-hunter2"), Some(Secret::new("old-hunter2")));
        let shown = format!("{rotating:?}");
        assert_eq!(shown, "Rotating { current: Secret([redacted]), previous: Some(Secret([redacted])) }");
        assert!(!format!("{:#?}", Some(rotating)).contains("hunter2"));
    }

    #[test]
    fn the_values_are_the_current_one_first() {
        let (new, old) = (Secret::new("new"), Secret::new("old"));
        let rotating = Rotating::with_previous(new.clone(), Some(old.clone()));
        assert_eq!(rotating.values().collect::<Vec<_>>(), [&new, &old]);
        assert_eq!(rotating.value(SecretValue::Previous), Some(&old));
        assert_eq!(Rotating::new(new.clone()).values().count(), 1);
        assert_eq!(Rotating::new(new).value(SecretValue::Previous), None);
    }

    #[test]
    fn shared_values_are_found_whichever_side_holds_them() {
        let a = Rotating::with_previous(Secret::new("a2"), Some(Secret::new("a1")));
        let b = Rotating::with_previous(Secret::new("b2"), Some(Secret::new("a1")));
        let c = Rotating::new(Secret::new("a2"));
        let d = Rotating::new(Secret::new("d"));
        assert!(a.shares_a_value_with(&b) && b.shares_a_value_with(&a));
        assert!(a.shares_a_value_with(&c) && c.shares_a_value_with(&a));
        assert!(!a.shares_a_value_with(&d) && !b.shares_a_value_with(&c));
        assert!(Rotating::with_previous(Secret::new("x"), Some(Secret::new("x"))).previous_is_current());
        assert!(!a.previous_is_current());
    }
}
