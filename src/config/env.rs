//! A snapshot of the environment and the helpers that turn its strings into typed values.
//!
//! Configuration never reads `std::env` after this snapshot is taken, so tests can build a
//! [`Config`](super::Config) from a plain map without touching the process environment.
//! Every helper names the variable in its error: a bad start must say which knob is wrong.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::secret::Secret;

/// Why a variable could not be used; displayed as one line: `NAME: problem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub var: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(var: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { var: var.into(), problem: problem.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// The variables the relay may read, captured once.
#[derive(Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
    /// Names whose value is not valid UTF-8: kept so the error can name them.
    not_unicode: Vec<String>,
}

impl fmt::Debug for Env {
    // Values are secrets as often as not: show the names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Env").field("names", &names).finish()
    }
}

impl Env {
    pub fn from_process() -> Self {
        Self::from_os_pairs(std::env::vars_os())
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self { vars: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect(), not_unicode: Vec::new() }
    }

    fn from_os_pairs(pairs: impl IntoIterator<Item = (OsString, OsString)>) -> Self {
        let mut env = Self::default();
        for (key, value) in pairs {
            let Ok(key) = key.into_string() else { continue };
            match value.into_string() {
                Ok(value) => {
                    env.vars.insert(key, value);
                }
                Err(_) => env.not_unicode.push(key),
            }
        }
        env
    }

    /// Adds the variables of an env file (`KEY=value` lines, `#` comments, optional quotes).
    /// Variables already set in the environment win, as with `docker run --env-file`
    /// followed by `-e`: the file holds defaults, the deployment overrides them.
    pub fn with_env_file(mut self, path: &Path) -> Result<Self, ConfigError> {
        let flag = "--env-file";
        let entries = dotenvy::from_path_iter(path)
            .map_err(|e| ConfigError::new(flag, format!("cannot read {}: {e}", path.display())))?;
        for entry in entries {
            let (key, value) = entry.map_err(|e| ConfigError::new(flag, format!("{}: {e}", path.display())))?;
            self.vars.entry(key).or_insert(value);
        }
        Ok(self)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    /// The value of `key`; an empty value counts as unset, as container tooling
    /// often writes `KEY=` for "not configured".
    pub fn get(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        if self.not_unicode.iter().any(|k| k == key) {
            return Err(ConfigError::new(key, "value is not valid UTF-8"));
        }
        Ok(self.vars.get(key).map(String::as_str).filter(|v| !v.is_empty()))
    }

    pub fn required(&self, key: &str) -> Result<&str, ConfigError> {
        self.get(key)?.ok_or_else(|| ConfigError::new(key, "required but not set"))
    }

    /// Parses `key` with `parse`, or returns `default` when it is unset.
    pub fn parsed<T>(
        &self,
        key: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(key)? {
            None => Ok(default),
            Some(raw) => parse(raw.trim()).map_err(|problem| ConfigError::new(key, problem)),
        }
    }

    /// A secret from `key` or from the file named by `<key>_FILE` (Docker and Kubernetes
    /// secrets are mounted as files). Setting both is refused: which one wins would be a guess.
    pub fn secret(&self, key: &str) -> Result<Option<Secret>, ConfigError> {
        let file_key = format!("{key}_FILE");
        match (self.get(key)?, self.get(&file_key)?) {
            (Some(_), Some(_)) => Err(ConfigError::new(key, format!("set either {key} or {file_key}, not both"))),
            (Some(value), None) => Ok(Some(Secret::new(value))),
            (None, Some(path)) => {
                let content = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::new(&file_key, format!("cannot read {path}: {e}")))?;
                // Files written by editors and `echo` end with a newline that is not part of the secret.
                let value = content.strip_suffix('\n').unwrap_or(&content);
                let value = value.strip_suffix('\r').unwrap_or(value);
                if value.is_empty() {
                    return Err(ConfigError::new(&file_key, format!("{path} is empty")));
                }
                Ok(Some(Secret::new(value)))
            }
            (None, None) => Ok(None),
        }
    }

    pub fn required_secret(&self, key: &str) -> Result<Secret, ConfigError> {
        self.secret(key)?.ok_or_else(|| ConfigError::new(key, format!("required but not set (nor {key}_FILE)")))
    }
}

/// Parses `1500ms`, `5s`, `2m`, `1h` or `7d`. A bare number is refused: `30` could mean
/// seconds or minutes, and guessing wrong turns a one-hour retry budget into a month.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split =
        raw.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("`{raw}` has no unit (use ms, s, m, h or d)"))?;
    let (digits, unit) = raw.split_at(split);
    let amount: u64 =
        digits.parse().map_err(|_| format!("`{raw}` is not a number followed by a unit (ms, s, m, h or d)"))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!("`{raw}` has an unknown unit (use ms, s, m, h or d)"));
        }
    };
    amount.checked_mul(millis_per_unit).map(Duration::from_millis).ok_or_else(|| format!("`{raw}` is too large"))
}

/// Parses a comma-separated list of durations such as `1s,5s,30s,2m`.
pub fn parse_duration_list(raw: &str) -> Result<Vec<Duration>, String> {
    raw.split(',').map(parse_duration).collect()
}

pub fn parse_u64(raw: &str) -> Result<u64, String> {
    raw.parse().map_err(|_| format!("`{raw}` is not a whole non-negative number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_every_documented_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    }

    #[test]
    fn durations_without_a_known_unit_are_refused() {
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn duration_lists_keep_their_order_and_tolerate_spaces() {
        assert_eq!(
            parse_duration_list("1s, 5s,2m"),
            Ok(vec![Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(120)])
        );
        assert!(parse_duration_list("1s,,5s").is_err());
    }

    #[test]
    fn empty_values_count_as_unset() {
        let env = Env::from_pairs([("A", "")]);
        assert_eq!(env.get("A"), Ok(None));
        assert_eq!(env.required("A").unwrap_err().to_string(), "A: required but not set");
    }

    #[test]
    fn secrets_come_from_a_file_without_its_final_newline() {
        let dir = std::env::temp_dir().join(format!("relay-env-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let env = Env::from_pairs([("TOKEN_FILE", path.to_str().unwrap())]);

        let secret = env.required_secret("TOKEN").unwrap();

        assert_eq!(secret.expose(), "s3cret");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_secret_set_twice_is_refused() {
        let env = Env::from_pairs([("TOKEN", "a"), ("TOKEN_FILE", "/x")]);
        let err = env.secret("TOKEN").unwrap_err();
        assert_eq!(err.var, "TOKEN");
        assert!(err.problem.contains("not both"));
    }

    #[test]
    fn an_unreadable_secret_file_names_the_file_variable() {
        let env = Env::from_pairs([("TOKEN_FILE", "/nonexistent/relay/secret")]);
        let err = env.secret("TOKEN").unwrap_err();
        assert_eq!(err.var, "TOKEN_FILE");
        assert!(err.problem.contains("/nonexistent/relay/secret"));
    }
}
