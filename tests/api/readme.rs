//! The README is exact: its Quick start's commands run as written (with `bash`, `curl` and
//! `openssl`, against the compiled relay), each printing what the README shows under it; the
//! `jobs list` table has the columns the README names; and README.md and BENCHMARKS.md link to
//! nothing that is not in the repository.
//!
//! How the Quick start is read: in each ```sh block of the section, a line that does not start
//! with `#` begins a command (continued by a trailing `\` or an unclosed `'`), and the `# ` lines
//! under it are what it prints on standard output, one line each, except that a line ending with
//! `,` goes on in the next one, its leading blanks dropped (the README wraps long JSON after a
//! comma). Standard error (cargo's build lines, `jobs`' store line) is not shown or compared.
//!
//! In the expected text, `…` stands for what differs from run to run (an id, a time, a
//! signature): one or more characters other than `"` and line breaks, so it can never hide a
//! field name, a whole field, an entry or a line. Everything else must be exactly what the
//! command prints: field names, their order, statuses, counts, spacing.
//!
//! The relay is started as the Quick start starts it, from its env file, but on free ports and
//! with a store of its own: the README's `127.0.0.1:8080` and `127.0.0.1:9091` are rewritten to
//! those ports in the env file's values, the channels file, and the commands (and back in what
//! they print). `cargo run --release --locked -- ARGS` runs the binary this test was built with.
//! Commands that only read are run again for up to 10 s until they print what the README shows
//! (a person typing them would see the relay's work done by then); the others run once.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::binary::{BINARY, RelayProcess, json_logs};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The addresses the Quick start's commands name; each run puts the relay on free ports and
/// rewrites them in the commands, and back in what the commands print.
const README_ADDR: &str = "127.0.0.1:8080";
const README_METRICS_ADDR: &str = "127.0.0.1:9091";
/// The commands of the Quick start the test does not run, with the reason.
const NOT_RUN: [(&str, &str); 1] = [("cargo test --locked", "the test suite itself")];

fn read(file: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The text of the `## {heading}` section, up to the next `## ` heading.
fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let title = format!("\n## {heading}\n");
    let start = markdown.find(&title).unwrap_or_else(|| panic!("no section {heading:?}")) + title.len();
    let end = markdown[start..].find("\n## ").map_or(markdown.len(), |end| start + end);
    &markdown[start..end]
}

/// The contents of the ```sh blocks of `text`, in order.
fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(block), "```") => {
                blocks.push(block.join("\n"));
                current = None;
            }
            (Some(block), _) => block.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```sh block");
    blocks
}

/// One command of a block and the lines the README shows it printing.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

fn is_complete(command: &str) -> bool {
    !command.ends_with('\\') && command.matches('\'').count().is_multiple_of(2)
}

fn steps(block: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for line in block.lines() {
        let open = steps.last().is_some_and(|step| !is_complete(&step.command));
        if open {
            let step = steps.last_mut().unwrap();
            step.command.push('\n');
            step.command.push_str(line);
        } else if let Some(output) = line.strip_prefix('#') {
            let step = steps.last_mut().unwrap_or_else(|| panic!("a `#` line before any command: {line:?}"));
            let output = output.strip_prefix(' ').unwrap_or(output);
            match step.expected.last_mut() {
                Some(last) if last.ends_with(',') => last.push_str(output.trim_start()),
                _ => step.expected.push(output.to_owned()),
            }
        } else if !line.trim().is_empty() {
            steps.push(Step { command: line.to_owned(), expected: Vec::new() });
        }
    }
    assert!(steps.iter().all(|step| is_complete(&step.command)), "a command left open: {steps:?}");
    steps
}

/// Whether `actual` is `expected` with each `…` standing for one or more characters other than
/// `"` (see the module's header).
fn matches(expected: &str, actual: &str) -> bool {
    fn rest(pieces: &[&str], actual: &str) -> bool {
        let Some((piece, more)) = pieces.split_first() else { return actual.is_empty() };
        // `actual` starts where a `…` stands: it takes at least one character, never a quote.
        let mut taken = actual.char_indices().skip(1).map(|(at, _)| at).chain([actual.len()]);
        let stop = actual.find('"').unwrap_or(actual.len());
        taken.any(|at| at <= stop && actual[at..].starts_with(piece) && rest(more, &actual[at + piece.len()..]))
    }
    let pieces: Vec<&str> = expected.split('…').collect();
    actual.strip_prefix(pieces[0]).is_some_and(|after| rest(&pieces[1..], after))
}

fn lines_match(expected: &[String], actual: &str) -> bool {
    let actual: Vec<&str> = actual.lines().collect();
    actual.len() == expected.len() && expected.iter().zip(actual).all(|(e, a)| matches(e, a))
}

/// `cargo run --release --locked -- --env-file FILE` alone: the relay itself, started by the test.
fn relay_start(command: &str) -> Option<&str> {
    command.strip_prefix("cargo run --release --locked -- --env-file ").filter(|file| !file.contains(' '))
}

/// A command that only reads (a `curl` without a body or another method): run again until it
/// prints what the README shows, as a person typing it would find it after a moment.
fn only_reads(command: &str) -> bool {
    command.starts_with("curl ") && !command.contains(" -d ") && !command.contains(" -X ")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `tool` runs here (`tool version`: openssl knows no `--version`).
fn have(tool: &str, version: &str) -> bool {
    std::process::Command::new(tool)
        .arg(version)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The relay a Quick start starts, on free ports and a store of its own, and the shell its
/// commands run in.
struct QuickStart {
    relay: Option<RelayProcess>,
    addr: String,
    metrics_addr: String,
    /// The variables the relay runs with over its env file; the commands get them too (the
    /// environment wins over the file), so `simulate` and `jobs` find the same relay and store.
    vars: Vec<(String, String)>,
    /// The variable assignments run so far (`body=…`), repeated before every later command.
    assignments: Vec<String>,
    /// How many relays this Quick start started: each gets a store of its own.
    starts: usize,
    data: tempfile::TempDir,
}

impl QuickStart {
    fn new() -> Self {
        Self {
            relay: None,
            addr: String::new(),
            metrics_addr: String::new(),
            vars: Vec::new(),
            assignments: Vec::new(),
            starts: 0,
            data: tempfile::tempdir().unwrap(),
        }
    }

    /// Starts the relay with `env_file` as the README does, on free ports: every value of the
    /// file (or of the channels file it names) holding the README's addresses is rewritten to
    /// the new ones, and the store goes to a temporary directory.
    async fn start(&mut self, env_file: &str) {
        if let Some(relay) = self.relay.take() {
            let (code, output) = relay.terminate().await;
            assert_eq!(code, 0, "{output:?}");
        }
        self.addr = format!("127.0.0.1:{}", free_port());
        self.metrics_addr = format!("127.0.0.1:{}", free_port());
        self.vars.clear();
        self.assignments.clear();
        self.starts += 1;
        let dir = self.data.path().to_owned();
        let file = read(env_file);
        for (key, value) in file.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')) {
            let value = match key {
                "RELAY_DATABASE_URL" => format!("sqlite://{}/store-{}.db", dir.display(), self.starts),
                "RELAY_CHANNELS_FILE" => {
                    let copy = dir.join(format!("channels-{}.toml", self.starts));
                    std::fs::write(&copy, self.rewrite(&read(value))).unwrap();
                    copy.display().to_string()
                }
                _ if value.contains(README_ADDR) || value.contains(README_METRICS_ADDR) => self.rewrite(value),
                _ => continue,
            };
            self.vars.push((key.to_owned(), value));
        }
        assert!(self.vars.iter().any(|(k, _)| k == "RELAY_ADDR"), "{env_file} sets RELAY_ADDR");
        assert!(self.vars.iter().any(|(k, _)| k == "RELAY_DATABASE_URL"), "{env_file} sets a store");
        let mut relay_vars = self.vars.clone();
        json_logs(&mut relay_vars);
        let env_path = Path::new(ROOT).join(env_file);
        self.relay = Some(RelayProcess::start(&relay_vars, &["--env-file", env_path.to_str().unwrap()]).await);
    }

    fn rewrite(&self, text: &str) -> String {
        text.replace(README_ADDR, &self.addr).replace(README_METRICS_ADDR, &self.metrics_addr)
    }

    fn unwrite(&self, text: &str) -> String {
        text.replace(&self.addr, README_ADDR).replace(&self.metrics_addr, README_METRICS_ADDR)
    }

    /// Runs `command` with bash in the repository, after the assignments so far; `cargo run
    /// --release --locked -- ARGS` runs the compiled binary with ARGS. Returns the exit status and
    /// standard output, addresses put back as the README writes them.
    async fn run(&self, command: &str) -> (Option<i32>, String, String) {
        let script = format!(
            "cargo() {{\n\
             \x20 [ \"$1 $2 $3 $4\" = 'run --release --locked --' ] || {{ echo \"cargo $*: not run by the test\" >&2; return 127; }}\n\
             \x20 shift 4; \"$RELAY_BINARY\" \"$@\"\n\
             }}\n{}\n{}\n",
            self.assignments.join("\n"),
            self.rewrite(command)
        );
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("bash")
                .args(["-c", &script])
                .current_dir(ROOT)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("RELAY_BINARY", BINARY)
                .envs(self.vars.iter().cloned())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{command}: no end within 30 s"))
        .unwrap();
        (
            output.status.code(),
            self.unwrite(&String::from_utf8_lossy(&output.stdout)),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs every command of the README's `heading` section and compares what it prints.
    async fn follow(&mut self, heading: &str) -> usize {
        let readme = read("README.md");
        let mut ran = 0;
        for block in sh_blocks(section(&readme, heading)) {
            for step in steps(&block) {
                if let Some((_, why)) = NOT_RUN.iter().find(|(command, _)| step.command == *command) {
                    eprintln!("readme: not run: {} ({why})", step.command);
                    continue;
                }
                if let Some(env_file) = relay_start(&step.command) {
                    assert!(step.expected.is_empty(), "the relay's start shows no output: {step:?}");
                    self.start(env_file).await;
                    continue;
                }
                assert!(self.relay.is_some(), "a command before the relay's start: {}", step.command);
                self.check(&step).await;
                let assignment = step.command.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                if assignment {
                    self.assignments.push(self.rewrite(&step.command));
                }
                ran += 1;
            }
        }
        if let Some(relay) = self.relay.take() {
            relay.terminate().await;
        }
        ran
    }

    async fn check(&self, step: &Step) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (code, stdout, stderr) = self.run(&step.command).await;
            if code == Some(0) && lines_match(&step.expected, &stdout) {
                return;
            }
            if code != Some(0) || !only_reads(&step.command) || tokio::time::Instant::now() >= deadline {
                let log = self.relay.as_ref().map(RelayProcess::output).unwrap_or_default();
                panic!(
                    "README.md: `{}`\nexits {code:?}; the README shows:\n{}\nit printed:\n{stdout}\nstandard error:\n{stderr}\nrelay log (last lines):\n{}",
                    step.command,
                    step.expected.join("\n"),
                    log[log.len().saturating_sub(15)..].join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The README's commands need bash, curl and openssl: the test is ignored where one was missing
/// from PATH when it was built (`readme_tests`, build.rs); missing now, it fails saying which.
fn assert_tools_present() {
    let missing: Vec<&str> = [("bash", "--version"), ("curl", "--version"), ("openssl", "version")]
        .into_iter()
        .filter(|(tool, version)| !have(tool, version))
        .map(|(tool, _)| tool)
        .collect();
    assert!(
        missing.is_empty(),
        "the README's commands need {missing:?} on PATH: install them (Debian: apt-get install bash curl openssl), \
         or `touch build.rs` to build again without them (outside CI) and have the test ignored"
    );
}

#[tokio::test]
#[cfg_attr(
    not(readme_tests),
    ignore = "the Quick start's commands need bash, curl and openssl on PATH: apt-get install bash curl openssl"
)]
async fn the_quick_start_prints_what_the_readme_shows() {
    assert_tools_present();
    let mut quick_start = QuickStart::new();

    let ran = quick_start.follow("Quick start").await;

    // Both sandboxes started and their commands ran: a section that lost its blocks would pass
    // with nothing compared.
    assert_eq!(quick_start.starts, 2, "the single-channel and the two-channel sandbox");
    assert!(ran >= 17, "only {ran} commands ran");
}

#[test]
fn the_readme_parser_and_its_ellipsis_are_strict() {
    // `…` is a value: never a quote, so never a field name, a field or an entry.
    assert!(matches(r#"{"mId":"…"}"#, r#"{"mId":"01a2"}"#));
    assert!(matches(r#"{"at":…,"ok":true}"#, r#"{"at":17,"ok":true}"#));
    assert!(!matches(r#"{"mId":"…"}"#, r#"{"mId":""}"#), "one character at least");
    assert!(!matches(r#"{"at":…,"ok":true}"#, r#"{"at":17,"other":1,"ok":true}"#));
    assert!(!matches(r#"[{"id":"…"}]"#, r#"[{"id":"a"},{"id":"b"}]"#));
    assert!(!matches(r#"{"status":200}"#, r#"{"status":400}"#));
    assert!(!matches("a … b", "a x b c"), "the end is anchored");
    assert!(matches("… of …", "one of of two"));
    assert!(!lines_match(&["a".into()], "a\nb"), "every line counts");

    let parsed = steps("curl -s x \\\n  -d 'a\nb'\n# {\"one\":1,\n#   \"two\":2}\n#   3\nbody='x'\n");
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[0].command, "curl -s x \\\n  -d 'a\nb'");
    assert_eq!(parsed[0].expected, ["{\"one\":1,\"two\":2}", "  3"]);
    assert_eq!(parsed[1].expected, Vec::<String>::new());
}

/// The README's "The table `jobs list` prints has the columns `a`, `b` (…) …;" sentence: the
/// columns it names, in order.
fn readme_table_columns() -> Vec<String> {
    let readme = read("README.md");
    let lead = "The table `jobs list` prints has the columns ";
    let start = readme.find(lead).unwrap_or_else(|| panic!("the README says {lead:?}")) + lead.len();
    // The list ends at the first `;` outside parentheses; what parentheses say about a column
    // is not a column.
    let mut named = String::new();
    let mut depth = 0_u32;
    for c in readme[start..].chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ';' if depth == 0 => return named.split('`').skip(1).step_by(2).map(str::to_owned).collect(),
            _ if depth == 0 => named.push(c),
            _ => {}
        }
    }
    panic!("the list of columns ends with `;`")
}

/// Splits a line of the table into its cells: columns are two or more blanks apart.
fn cells(line: &str) -> Vec<(usize, &str)> {
    let mut cells = Vec::new();
    let mut start = None;
    let bytes = line.as_bytes();
    for (at, &b) in bytes.iter().enumerate() {
        let gap = b == b' ' && (bytes.get(at + 1) == Some(&b' ') || at > 0 && bytes[at - 1] == b' ');
        match (start, gap) {
            (None, false) => start = Some(at),
            (Some(from), true) => {
                cells.push((from, &line[from..at]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(from) = start {
        cells.push((from, &line[from..]));
    }
    cells
}

/// `jobs list` prints the columns the README names, and a queued job's row lines up under
/// them: right-aligned numbers end where their heading ends, the rest start where it starts.
#[tokio::test]
async fn jobs_list_shows_every_column_the_readme_names_and_a_row_under_them() {
    use bonychat_relay::store::JobState;

    use crate::helpers::{PSID, Reply, spawn_app_with, text};

    // Arrange: a message JoinChat refused with a 503, queued for an hour.
    let app = spawn_app_with(&[("RELAY_RETRY_JOINCHAT", "1h")]).await;
    app.joinchat.script([Reply::status(503, r#"{"success":false,"errors":{"msg":"down for maintenance"}}"#)]);
    let (status, _) = app.send(PSID, text("queued for an hour")).await;
    assert_eq!(status, 200);
    let job = app.jobs(JobState::Queued).await.pop().expect("the message is queued");
    let store: Vec<(String, String)> = app.vars.iter().filter(|(k, _)| k == "RELAY_DATABASE_URL").cloned().collect();

    // Act
    let (code, table, stderr) = crate::binary::run_binary(&store, &["jobs", "list"]).await;
    app.stop().await;

    // Assert
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let header = cells(lines[0]);
    let names: Vec<&str> = header.iter().map(|(_, name)| *name).collect();
    assert_eq!(names, readme_table_columns(), "the README names the table's columns: {table}");
    assert_eq!(
        lines[0],
        "      id  channel       dir       state      attempts  next attempt             contact               mId                                 last error"
    );
    // The time as `date` writes it, rather than as the relay's own code does.
    let date = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}", job.next_attempt_at.div_euclid(1000)), "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .expect("date runs");
    let next_attempt = String::from_utf8(date.stdout).unwrap().trim().to_owned();
    let error = job.last_error.as_deref().expect("the 503 is the last error");
    assert!(error.contains("503"), "{error}");
    let error: String = error.chars().take(60).collect();
    assert_eq!(
        lines[1],
        format!(
            "{:>8}  default       outbound  queued            1  {next_attempt}  {PSID}      {}    {error}",
            job.id, job.m_id
        )
        .trim_end()
    );
    let row = cells(lines[1]);
    assert_eq!(row.len(), header.len(), "one cell per column: {table}");
    for ((at, name), (cell_at, cell)) in header.iter().zip(&row) {
        if ["id", "attempts"].contains(name) {
            assert_eq!(at + name.len(), cell_at + cell.len(), "{name} is right-aligned: {table}");
        } else {
            assert_eq!(at, cell_at, "{name} is left-aligned: {table}");
        }
    }
    assert!(next_attempt.ends_with(" UTC") && next_attempt.len() == 23, "{next_attempt}");
}

/// Every `*.md` file of the repository, `target/` and hidden directories left out.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                walk(&path, found);
            } else if name.ends_with(".md") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new(ROOT), &mut found);
    found.sort();
    found
}

/// The anchors GitHub gives the headings of `markdown` (code blocks left out): lower case,
/// blanks as `-`, punctuation other than `-` and `_` dropped, `-1`, `-2` … after repeats.
fn anchors(markdown: &str) -> Vec<String> {
    let mut anchors: Vec<String> = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let Some(title) = line.strip_prefix('#').filter(|_| !in_code) else { continue };
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let repeats = anchors.iter().filter(|a| **a == slug || a.starts_with(&format!("{slug}-"))).count();
        anchors.push(if repeats == 0 { slug } else { format!("{slug}-{repeats}") });
    }
    anchors
}

/// The targets of the Markdown links and images of `markdown`: `[text](target)`.
fn link_targets(markdown: &str) -> Vec<String> {
    markdown
        .split("](")
        .skip(1)
        .filter_map(|after| after.split_once(')').map(|(target, _)| target.split_whitespace().next().unwrap_or("")))
        .map(str::to_owned)
        .collect()
}

/// A link of the README or BENCHMARKS.md (or any Markdown file here) to a relative path must
/// name a file of the repository, and an anchor a heading of its file; and no Markdown file
/// sends the reader outside the repository (`../` past its root, `/work/…`).
#[test]
fn markdown_links_point_inside_the_repository() {
    let root = Path::new(ROOT).canonicalize().unwrap();
    let mut broken = Vec::new();
    let files = markdown_files();
    assert!(files.iter().any(|f| f.ends_with("README.md")) && files.iter().any(|f| f.ends_with("BENCHMARKS.md")));
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.strip_prefix(ROOT).unwrap().display().to_string();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').map_or((target.as_str(), None), |(p, a)| (p, Some(a)));
            let linked = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
            match linked.canonicalize() {
                Ok(found) if found.starts_with(&root) => {
                    if let Some(anchor) = anchor.filter(|_| found.extension().is_some_and(|e| e == "md")) {
                        let headings = anchors(&std::fs::read_to_string(&found).unwrap());
                        if !headings.iter().any(|h| h == anchor) {
                            broken.push(format!("{name}: {target}: no such heading"));
                        }
                    }
                }
                Ok(_) => broken.push(format!("{name}: {target}: outside the repository")),
                Err(e) => broken.push(format!("{name}: {target}: {e}")),
            }
        }
        for outside in ["../shared", "shared/reference", "/work/"] {
            if text.contains(outside) {
                broken.push(format!("{name}: names {outside:?}, outside the repository"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
