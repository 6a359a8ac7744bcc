//! A snapshot of the environment and the helpers that turn its strings into typed values.
//!
//! Configuration never reads `std::env` after this snapshot is taken, so tests can build a
//! [`Config`](super::Config) from a plain map without touching the process environment.
//! Every helper names the variable in its error: a bad start must say which knob is wrong.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use super::secret::{Rotating, Secret};

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
    /// Always one line: a control character in the problem (a path or a non-secret value
    /// quoted back) is written escaped, so the message cannot break a log line in two.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.var)?;
        for c in self.problem.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The most a `<NAME>_FILE` secret file may hold: keys and tokens are a few hundred bytes.
pub const SECRET_FILE_CAP: u64 = 64 * 1024;
/// The most an `--env-file` may hold.
pub const ENV_FILE_CAP: u64 = 1024 * 1024;

/// Reads a regular file of at most `cap` bytes, or says why not.
///
/// A FIFO, a device such as `/dev/zero` or a directory would make a naive read hang or eat
/// memory. The file is opened with `O_NONBLOCK` (opening a FIFO then returns at once instead
/// of waiting for a writer), the opened file itself is checked, so no path swapped in between
/// can slip through, and it is read through `take(cap + 1)` so that a file growing meanwhile is
/// still refused, not slurped.
pub(super) fn read_small_file(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let too_large = || format!("{shown} is larger than {} KiB", cap / 1024);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    let opened = file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !opened.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if opened.len() > cap {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(bytes)
}

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
    ///
    /// The file must be a regular file of at most `ENV_FILE_CAP` bytes. A line that cannot be
    /// parsed is reported by its number and variable name, never its value (it may be a secret).
    pub fn with_env_file(mut self, path: &Path) -> Result<Self, ConfigError> {
        let flag = "--env-file";
        let bytes = read_small_file(path, ENV_FILE_CAP).map_err(|problem| ConfigError::new(flag, problem))?;
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        for entry in dotenvy::from_read_iter(bytes) {
            let (key, value) = entry.map_err(|e| ConfigError::new(flag, env_file_problem(path, bytes, &e)))?;
            self.vars.entry(key).or_insert(value);
        }
        Ok(self)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    /// The value of `key`; an empty value counts as unset, as container tooling
    /// often writes `KEY=` for "not configured".
    ///
    /// A value of only whitespace is refused: it is a slip (a stray space after `=`), and read
    /// as "unset" it would silently switch a feature off, read as a value it would be nonsense.
    pub fn get(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        if self.not_unicode.iter().any(|k| k == key) {
            return Err(ConfigError::new(key, "value is not valid UTF-8"));
        }
        match self.vars.get(key).map(String::as_str).filter(|v| !v.is_empty()) {
            Some(value) if value.trim().is_empty() => Err(ConfigError::new(
                key,
                "is blank (only whitespace); give it a value, or leave it empty to mean unset",
            )),
            Some(value) if is_placeholder(value) => Err(ConfigError::new(key, PLACEHOLDER_PROBLEM)),
            value => Ok(value),
        }
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
        self.secret_or_empty_file(key, false)
    }

    /// [`Env::secret`]; with `empty_file_is_unset`, a `<key>_FILE` that is empty counts as
    /// unset, as an empty variable does.
    fn secret_or_empty_file(&self, key: &str, empty_file_is_unset: bool) -> Result<Option<Secret>, ConfigError> {
        let file_key = format!("{key}_FILE");
        match (self.get(key)?, self.get(&file_key)?) {
            (Some(_), Some(_)) => Err(ConfigError::new(key, format!("set either {key} or {file_key}, not both"))),
            (Some(value), None) => Ok(Some(Secret::new(usable_secret(key, value)?))),
            (None, Some(path)) if empty_file_is_unset => {
                read_optional_secret_file(Path::new(path)).map_err(|problem| ConfigError::new(&file_key, problem))
            }
            (None, Some(path)) => {
                read_secret_file(Path::new(path)).map(Some).map_err(|problem| ConfigError::new(&file_key, problem))
            }
            (None, None) => Ok(None),
        }
    }

    pub fn required_secret(&self, key: &str) -> Result<Secret, ConfigError> {
        self.secret(key)?.ok_or_else(|| ConfigError::new(key, format!("required but not set (nor {key}_FILE)")))
    }

    /// A secret with the value it replaces during a rotation: `key` (or `<key>_FILE`) and
    /// `<key>_PREVIOUS` (or `<key>_PREVIOUS_FILE`), each read by the rules of [`Env::secret`],
    /// except that an empty `<key>_PREVIOUS_FILE` means "no previous value": the variable can
    /// name its file from the start, and a rotation then takes no restart (write the old value
    /// there and `SIGHUP`; empty it and `SIGHUP` once the rotation is over).
    ///
    /// A previous value without a current one is refused: it is a rotation half set up (or
    /// the new value put in the wrong variable), and it would be the only value in use.
    pub fn rotating(&self, key: &str) -> Result<Option<Rotating>, ConfigError> {
        let previous_key = format!("{key}_PREVIOUS");
        let current = self.secret(key)?;
        let previous = self.secret_or_empty_file(&previous_key, true)?;
        match (current, previous) {
            (Some(current), previous) => Ok(Some(Rotating::with_previous(current, previous))),
            (None, None) => Ok(None),
            (None, Some(_)) => {
                let named =
                    if self.get(&previous_key)?.is_some() { previous_key } else { format!("{previous_key}_FILE") };
                Err(ConfigError::new(
                    named,
                    format!(
                        "is set but {key} is not (nor {key}_FILE): the previous value is kept beside a current \
                         one during a rotation, never alone"
                    ),
                ))
            }
        }
    }

    pub fn required_rotating(&self, key: &str) -> Result<Rotating, ConfigError> {
        self.rotating(key)?.ok_or_else(|| ConfigError::new(key, format!("required but not set (nor {key}_FILE)")))
    }
}

/// Reads a secret from a file (Docker and Kubernetes mount secrets as files): a small regular
/// file of UTF-8 text, without its final line break. The problem never quotes the content.
pub(super) fn read_secret_file(path: &Path) -> Result<Secret, String> {
    read_optional_secret_file(path)?.ok_or_else(|| format!("{} is empty", path.display()))
}

/// [`read_secret_file`], but an empty file (or one holding a line break alone) is no secret
/// rather than an error: how a previous value's file says that no rotation is under way.
/// A blank file (spaces) is still refused: it is a slip, not "nothing".
pub(super) fn read_optional_secret_file(path: &Path) -> Result<Option<Secret>, String> {
    let shown = path.display();
    let bytes = read_small_file(path, SECRET_FILE_CAP)?;
    let content = String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text"))?;
    // Files written by editors and `echo` end with a newline that is not part of the
    // secret: exactly one is removed. Anything more is refused below, not trimmed:
    // a second line break or a space is a slip the operator should see.
    let value = content.strip_suffix("\r\n").or_else(|| content.strip_suffix('\n')).unwrap_or(&content);
    if value.is_empty() {
        return Ok(None);
    }
    if value.trim().is_empty() {
        return Err(format!("{shown} is blank (only whitespace)"));
    }
    secret_problem(value).map_err(str::to_owned)?;
    Ok(Some(Secret::new(value)))
}

/// A secret holding a control character (a line break most often: a second line pasted in, a
/// file with two lines) would go out in headers and signatures as something else than the
/// operator meant, or be refused by the HTTP client at the first request; refused at start
/// instead. So is one starting or ending with whitespace (a space pasted with it, a quoted
/// value with a space inside the quotes): the other side never sends or signs with it, so it
/// would never match, and trimming it silently would hide the slip. The value is never shown.
fn usable_secret<'a>(var: &str, value: &'a str) -> Result<&'a str, ConfigError> {
    secret_problem(value).map_err(|problem| ConfigError::new(var, problem))?;
    Ok(value)
}

/// Why `value` cannot be a secret, if it cannot (see [`usable_secret`]); never quotes it.
pub(super) fn secret_problem(value: &str) -> Result<(), &'static str> {
    if is_placeholder(value) {
        return Err(PLACEHOLDER_PROBLEM);
    }
    if value.chars().any(char::is_control) {
        return Err(
            "holds a control character or line break (value not shown); a secret is one line of printable text",
        );
    }
    if value.trim() != value {
        return Err(
            "starts or ends with whitespace (value not shown); a secret never does, and with it nothing would \
             match: remove the spaces",
        );
    }
    Ok(())
}

/// What a value still holding [`is_placeholder`]'s marker is told; the value is not quoted (it
/// may stand where a secret goes).
pub(super) const PLACEHOLDER_PROBLEM: &str = "is still a placeholder (it starts with change-me, as in config/example.env; \
     value not shown): replace it with the real value";

/// Whether `value` is one of the placeholders `config/example.env` (and the Kubernetes examples)
/// put where the operator must supply a value: it starts with `change-me` (or `changeme`,
/// `change_me`, in any case) followed by nothing or by a character that is not a letter or a
/// digit (`change-me-joinchat-api-secret`). Left in, such a value would start a relay that signs
/// with a published key or posts to nowhere, so it is refused like a blank one.
///
/// No real value is caught: generated tokens and keys are random characters, an id is digits,
/// and a word that merely begins with the same letters (`change-meadow`) goes through.
pub(super) fn is_placeholder(value: &str) -> bool {
    let lower = value.trim().to_ascii_lowercase();
    ["change-me", "changeme", "change_me"].iter().any(|marker| {
        lower.strip_prefix(marker).is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_alphanumeric()))
    })
}

/// Describes an env-file error without the offending line, which may hold a secret: the line
/// number and, when it looks like one, the variable name before `=`.
fn env_file_problem(path: &Path, content: &[u8], error: &dotenvy::Error) -> String {
    let shown = path.display();
    let dotenvy::Error::LineParse(line, _) = error else {
        return format!("cannot read {shown}: {error}");
    };
    let text = String::from_utf8_lossy(content);
    let number = text.find(line.as_str()).map(|at| text[..at].matches('\n').count() + 1);
    let name = line
        .split_once('=')
        .map(|(name, _)| name.trim().trim_start_matches("export ").trim())
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    let at = match (number, name) {
        (Some(n), Some(name)) => format!("line {n} ({name})"),
        (Some(n), None) => format!("line {n}"),
        (None, Some(name)) => format!("the line of {name}"),
        (None, None) => "a line".to_owned(),
    };
    format!("{shown}: {at} is not KEY=value (value not shown)")
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

    /// `TOKEN_FILE` pointing at `path`, read as the secret `TOKEN`.
    fn secret_from(path: &Path) -> Result<Option<Secret>, ConfigError> {
        Env::from_pairs([("TOKEN_FILE", path.to_str().unwrap())]).secret("TOKEN")
    }

    fn make_fifo(path: &Path) {
        let made = std::process::Command::new("mkfifo").arg(path).status().expect("mkfifo runs");
        assert!(made.success(), "mkfifo {}", path.display());
    }

    #[test]
    fn a_secret_file_that_is_a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("token");
        make_fifo(&fifo);

        // Opening a FIFO for reading blocks until a writer comes: this must not even open it.
        let err = secret_from(&fifo).unwrap_err();

        assert_eq!(err.var, "TOKEN_FILE");
        assert_eq!(err.problem, format!("{} is not a regular file", fifo.display()));
    }

    #[test]
    fn a_secret_file_that_is_a_device_or_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for path in [Path::new("/dev/zero"), dir.path()] {
            let err = secret_from(path).unwrap_err();
            assert_eq!(err.var, "TOKEN_FILE");
            assert!(err.problem.ends_with("is not a regular file"), "{err}");
        }
    }

    #[test]
    fn a_secret_file_larger_than_64_kib_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "a".repeat(64 * 1024 + 1)).unwrap();

        let err = secret_from(&path).unwrap_err();

        assert_eq!(err.var, "TOKEN_FILE");
        assert!(err.problem.contains("larger than 64 KiB"), "{err}");
        assert!(!err.problem.contains("aaaa"), "{err}");
        std::fs::write(&path, "a".repeat(64 * 1024)).unwrap();
        assert_eq!(secret_from(&path).unwrap().unwrap().expose().len(), 64 * 1024, "the cap itself is fine");
    }

    #[test]
    fn a_file_of_exactly_the_cap_is_read_and_one_byte_more_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, [b'x'; 100]).unwrap();

        assert!(read_small_file(&path, 99).unwrap_err().contains("larger than"));
        assert_eq!(read_small_file(&path, 100).unwrap().len(), 100);
    }

    #[test]
    fn a_secret_file_strips_exactly_one_final_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for (content, secret) in [("s3cret", "s3cret"), ("s3cret\n", "s3cret"), ("s3cret\r\n", "s3cret")] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(secret_from(&path).unwrap().unwrap().expose(), secret, "{content:?}");
        }
        for content in ["s3cret\n\n", "s3cret\r", "two\nlines\n", "tab\there"] {
            std::fs::write(&path, content).unwrap();
            let err = secret_from(&path).unwrap_err();
            assert_eq!(err.var, "TOKEN_FILE", "{content:?}");
            assert!(err.problem.contains("control character"), "{err}");
        }
    }

    #[test]
    fn a_secret_with_a_control_character_is_refused_without_showing_it() {
        for value in ["line1\nline2", "with\rreturn", "nul\0byte", "esc\u{1b}[0m", "del\u{7f}"] {
            let err = Env::from_pairs([("TOKEN", value)]).secret("TOKEN").unwrap_err();
            assert_eq!(err.var, "TOKEN");
            assert!(err.problem.contains("control character"), "{err}");
            for part in ["line1", "line2", "return", "byte", "esc"] {
                assert!(!err.to_string().contains(part), "{err}");
            }
        }
        assert_eq!(
            Env::from_pairs([("TOKEN", "spaces are fine")]).secret("TOKEN").unwrap().unwrap().expose(),
            "spaces are fine"
        );
    }

    #[test]
    fn a_secret_with_leading_or_trailing_whitespace_is_refused_without_showing_it() {
        for value in [" s3cret", "s3cret ", "  s3cret  ", "s3cret\u{a0}", "\u{3000}s3cret"] {
            let err = Env::from_pairs([("TOKEN", value)]).secret("TOKEN").unwrap_err();
            assert_eq!(err.var, "TOKEN", "{value:?}");
            assert!(err.problem.contains("starts or ends with whitespace"), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn a_secret_file_keeps_one_final_line_break_off_and_refuses_any_other_outer_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for content in ["s3cret", "s3cret\n", "s3cret\r\n", "s3 cret\n"] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(secret_from(&path).unwrap().unwrap().expose(), content.trim_end(), "{content:?}");
        }
        for content in [" s3cret\n", "s3cret \n", "s3cret \r\n", "s3cret\n \n", "\u{2003}s3cret\n"] {
            std::fs::write(&path, content).unwrap();
            let err = secret_from(&path).unwrap_err();
            assert_eq!(err.var, "TOKEN_FILE", "{content:?}");
            assert!(err.problem.contains("whitespace") || err.problem.contains("control character"), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn a_blank_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  \n").unwrap();

        let err = secret_from(&path).unwrap_err();

        assert_eq!(err.var, "TOKEN_FILE");
        assert!(err.problem.contains("blank"), "{err}");
    }

    #[test]
    fn a_value_of_only_whitespace_is_refused_naming_the_variable() {
        for value in [" ", "   ", "\t", " \n "] {
            let env = Env::from_pairs([("A", value), ("TOKEN", value)]);
            let err = env.get("A").unwrap_err();
            assert_eq!(err.var, "A");
            assert!(err.problem.contains("blank"), "{err}");
            assert_eq!(env.secret("TOKEN").unwrap_err().var, "TOKEN");
        }
    }

    #[test]
    fn errors_are_one_line_even_when_they_quote_a_line_break() {
        let err = ConfigError::new("A", "`x\ny` is not a number");
        assert_eq!(err.to_string(), "A: `x\\ny` is not a number");
    }

    fn env_file(content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.env");
        std::fs::write(&path, content).unwrap();
        (dir, path)
    }

    #[test]
    fn an_env_file_adds_variables_without_overriding_the_environment() {
        let (_dir, path) = env_file(b"\xEF\xBB\xBFA=from-file\n# comment\nB=\"quoted value\"\nC=file\n");

        let env = Env::from_pairs([("C", "process")]).with_env_file(&path).unwrap();

        assert_eq!(env.get("A"), Ok(Some("from-file")), "a leading BOM is not part of the first name");
        assert_eq!(env.get("B"), Ok(Some("quoted value")));
        assert_eq!(env.get("C"), Ok(Some("process")));
    }

    #[test]
    fn an_env_file_that_is_not_a_small_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.env");
        make_fifo(&fifo);
        let big = dir.path().join("big.env");
        std::fs::write(&big, format!("A={}\n", "x".repeat(1024 * 1024))).unwrap();

        for (path, problem) in [
            (fifo.as_path(), "is not a regular file"),
            (Path::new("/dev/zero"), "is not a regular file"),
            (dir.path(), "is not a regular file"),
            (big.as_path(), "is larger than 1024 KiB"),
        ] {
            let err = Env::default().with_env_file(path).unwrap_err();
            assert_eq!(err.var, "--env-file");
            assert_eq!(err.problem, format!("{} {problem}", path.display()));
        }
    }

    #[test]
    fn an_env_file_parse_error_names_the_line_but_not_its_value() {
        let cases: &[(&[u8], &str)] = &[
            (b"A=1\n\nBONYCHAT_API_TOKEN=s3cr3t\"tail\nB=2\n", "line 3 (BONYCHAT_API_TOKEN)"),
            (b"A=1\ns3cr3t pasted without a name\n", "line 2"),
            (b"# comment\nBAD-NAME=s3cr3t\n", "line 2"),
        ];
        for (content, at) in cases {
            let (_dir, path) = env_file(content);

            let err = Env::default().with_env_file(&path).unwrap_err();

            assert_eq!(err.var, "--env-file");
            assert!(err.problem.contains(at), "{at}: {err}");
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
    }

    #[test]
    fn a_rotating_secret_reads_its_previous_value_by_the_same_rules() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old-token");
        std::fs::write(&old, "old-value\n").unwrap();

        let from_file =
            Env::from_pairs([("TOKEN", "new-value"), ("TOKEN_PREVIOUS_FILE", old.to_str().unwrap())]).rotating("TOKEN");
        let from_var = Env::from_pairs([("TOKEN", "new-value"), ("TOKEN_PREVIOUS", "old-value")]).rotating("TOKEN");
        let alone = Env::from_pairs([("TOKEN", "new-value")]).rotating("TOKEN");

        for rotating in [from_file, from_var] {
            let rotating = rotating.unwrap().unwrap();
            assert_eq!(rotating.current.expose(), "new-value");
            assert_eq!(rotating.previous.unwrap().expose(), "old-value");
        }
        assert_eq!(alone.unwrap().unwrap().previous, None);
        assert_eq!(Env::default().rotating("TOKEN"), Ok(None));
    }

    #[test]
    fn an_empty_previous_file_means_no_rotation_and_an_empty_current_file_is_still_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (empty, newline) = (dir.path().join("empty"), dir.path().join("newline"));
        std::fs::write(&empty, "").unwrap();
        std::fs::write(&newline, "\n").unwrap();

        for path in [&empty, &newline] {
            let env = Env::from_pairs([("TOKEN", "new-value"), ("TOKEN_PREVIOUS_FILE", path.to_str().unwrap())]);
            assert_eq!(env.rotating("TOKEN").unwrap().unwrap().previous, None, "{}", path.display());
            let env = Env::from_pairs([("TOKEN_FILE", path.to_str().unwrap())]);
            let err = env.rotating("TOKEN").unwrap_err();
            assert_eq!((err.var.as_str(), err.problem.ends_with("is empty")), ("TOKEN_FILE", true), "{err}");
        }
        let alone = Env::from_pairs([("TOKEN_PREVIOUS_FILE", empty.to_str().unwrap())]);
        assert_eq!(alone.rotating("TOKEN"), Ok(None), "an empty previous file alone is no rotation either");
    }

    #[test]
    fn a_previous_value_without_a_current_one_is_refused_naming_the_variable_set() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old-token");
        std::fs::write(&old, "old-value\n").unwrap();
        for (var, value) in [("TOKEN_PREVIOUS", "old-value"), ("TOKEN_PREVIOUS_FILE", old.to_str().unwrap())] {
            let err = Env::from_pairs([(var, value)]).rotating("TOKEN").unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.problem.contains("TOKEN is not"), "{err}");
            assert!(!err.to_string().contains("old-value"), "{err}");
        }
        let err = Env::from_pairs([("TOKEN_PREVIOUS", "old-value")]).required_rotating("TOKEN").unwrap_err();
        assert_eq!(err.var, "TOKEN_PREVIOUS", "the half-made rotation, not a missing TOKEN: {err}");
    }

    #[test]
    fn a_previous_value_is_refused_like_any_secret() {
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank");
        std::fs::write(&blank, " \n").unwrap();
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("TOKEN_PREVIOUS", "two\nlines")], "TOKEN_PREVIOUS"),
            (&[("TOKEN_PREVIOUS", " padded")], "TOKEN_PREVIOUS"),
            (&[("TOKEN_PREVIOUS", "a"), ("TOKEN_PREVIOUS_FILE", "/x")], "TOKEN_PREVIOUS"),
            (&[("TOKEN_PREVIOUS_FILE", blank.to_str().unwrap())], "TOKEN_PREVIOUS_FILE"),
            (&[("TOKEN_PREVIOUS_FILE", "/dev/zero")], "TOKEN_PREVIOUS_FILE"),
        ];
        for (pairs, var) in cases {
            let mut pairs = pairs.to_vec();
            pairs.push(("TOKEN", "new-value"));
            let err = Env::from_pairs(pairs).rotating("TOKEN").unwrap_err();
            assert_eq!(&err.var, var, "{err}");
        }
    }

    #[test]
    fn an_unreadable_secret_file_names_the_file_variable() {
        let env = Env::from_pairs([("TOKEN_FILE", "/nonexistent/relay/secret")]);
        let err = env.secret("TOKEN").unwrap_err();
        assert_eq!(err.var, "TOKEN_FILE");
        assert!(err.problem.contains("/nonexistent/relay/secret"));
    }
}
