//! `OTEL_*`: whether and where spans are exported (SPEC §6), with the names and meanings the
//! OpenTelemetry SDK specification gives these variables, read from the relay's own snapshot
//! of the environment (so a test's relay and `--env-file` see them like the others).
//!
//! Traces are off unless an OTLP endpoint is set. Only OTLP over HTTP is spoken: a `grpc`
//! protocol is refused with what to set instead, never silently exported nowhere.

use std::time::Duration;

use url::Url;

use super::env::{ConfigError, Env};
use super::{REDACTED, Secret, http_url, positive_count, shown_url, timeout_millis};

pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// The variables read, each with its signal-specific form where the specification has one
/// (`OTEL_EXPORTER_OTLP_TRACES_*` wins over `OTEL_EXPORTER_OTLP_*`).
pub const VARS: &[&str] = &[
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    ENDPOINT,
    TRACES_ENDPOINT,
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
];

/// Read only to be refused: a custom certificate authority or a client certificate, which the
/// relay's HTTP client does not take (a silent ignore would fail every export with a TLS error).
pub const REFUSED_VARS: &[&str] = &[
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
];

const DEFAULT_SERVICE_NAME: &str = "bonychat-relay";

/// How spans are exported, when they are.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Where spans are posted: the traces endpoint as given, or the base endpoint + `/v1/traces`.
    pub url: Url,
    pub protocol: OtlpProtocol,
    /// Sent with every export (a collector's API key, often): values are secrets.
    pub headers: Vec<(String, Secret)>,
    /// Per export request.
    pub timeout: Duration,
    pub gzip: bool,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`, besides `service.name`.
    pub resource: Vec<(String, String)>,
    pub sampler: Sampler,
    /// Spans waiting for export at most; past it, new ones are dropped (and counted).
    pub max_queue: usize,
    pub max_batch: usize,
    /// How long a span may wait for its batch to fill.
    pub schedule_delay: Duration,
    /// How long one export may take, retries included.
    pub export_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Protobuf,
    Json,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Protobuf => "http/protobuf",
            Self::Json => "http/json",
        }
    }
}

/// `OTEL_TRACES_SAMPLER` with its argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    /// Follows the caller's sampling decision; the inner sampler decides for new traces.
    ParentBased(RootSampler),
}

impl Sampler {
    /// Its `OTEL_TRACES_SAMPLER` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::AlwaysOn => "always_on",
            Self::AlwaysOff => "always_off",
            Self::Ratio(_) => "traceidratio",
            Self::ParentBased(RootSampler::AlwaysOn) => "parentbased_always_on",
            Self::ParentBased(RootSampler::AlwaysOff) => "parentbased_always_off",
            Self::ParentBased(RootSampler::Ratio(_)) => "parentbased_traceidratio",
        }
    }

    /// Its `OTEL_TRACES_SAMPLER_ARG`, for the samplers that take one.
    pub fn ratio(self) -> Option<f64> {
        match self {
            Self::Ratio(ratio) | Self::ParentBased(RootSampler::Ratio(ratio)) => Some(ratio),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

/// The export configuration, or `None` when traces are off: no endpoint set,
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
pub fn from_env(env: &Env) -> Result<Option<OtlpConfig>, ConfigError> {
    let disabled = env.parsed("OTEL_SDK_DISABLED", false, |raw| match raw.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("`{other}` is neither true nor false")),
    })?;
    let exporting = env.parsed("OTEL_TRACES_EXPORTER", true, |raw| match raw {
        "otlp" => Ok(true),
        "none" => Ok(false),
        other => Err(format!("`{other}` is not supported: the relay exports with `otlp` (over HTTP), or `none`")),
    })?;
    let url = match (env.get(TRACES_ENDPOINT)?, env.get(ENDPOINT)?) {
        (Some(traces), _) => http_url(traces.trim()).map_err(|problem| ConfigError::new(TRACES_ENDPOINT, problem))?,
        (None, Some(base)) => {
            let base = http_url(base.trim()).map_err(|problem| ConfigError::new(ENDPOINT, problem))?;
            traces_url(&base).map_err(|problem| ConfigError::new(ENDPOINT, problem))?
        }
        (None, None) => return Ok(None),
    };
    if disabled || !exporting {
        return Ok(None);
    }
    for what in ["CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"] {
        if let (var, Some(_)) = signal(env, what)? {
            return Err(ConfigError::new(
                var,
                "is not supported: the relay trusts the system's certificate authorities; give the collector a \
                 certificate they sign, or put it behind a proxy that has one",
            ));
        }
    }
    let (protocol_var, protocol) = signal(env, "PROTOCOL")?;
    let protocol = match protocol.map(str::trim) {
        None | Some("http/protobuf") => OtlpProtocol::Protobuf,
        Some("http/json") => OtlpProtocol::Json,
        Some("grpc") => {
            return Err(ConfigError::new(
                protocol_var,
                "grpc is not supported: set http/protobuf (or http/json) and point the endpoint at the \
                 collector's OTLP/HTTP port (4318 by default)",
            ));
        }
        Some(other) => {
            return Err(ConfigError::new(protocol_var, format!("`{other}` is not http/protobuf or http/json")));
        }
    };
    let (headers_var, headers) = signal(env, "HEADERS")?;
    let headers = headers.map(|raw| parse_headers(raw).map_err(|problem| ConfigError::new(headers_var, problem)));
    let (timeout_var, timeout) = signal(env, "TIMEOUT")?;
    let timeout =
        timeout.map(|raw| timeout_millis(raw.trim()).map_err(|problem| ConfigError::new(timeout_var, problem)));
    let (compression_var, compression) = signal(env, "COMPRESSION")?;
    let gzip = match compression.map(str::trim) {
        None | Some("none") => false,
        Some("gzip") => true,
        Some(other) => return Err(ConfigError::new(compression_var, format!("`{other}` is not gzip or none"))),
    };
    let max_queue = env.parsed("OTEL_BSP_MAX_QUEUE_SIZE", 2048, span_count)?;
    let max_batch = env.parsed("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512.min(max_queue), span_count)?;
    if max_batch > max_queue {
        return Err(ConfigError::new(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            format!("must be at most OTEL_BSP_MAX_QUEUE_SIZE ({max_queue})"),
        ));
    }
    let service_name =
        env.get("OTEL_SERVICE_NAME")?.map_or_else(|| DEFAULT_SERVICE_NAME.to_owned(), |name| name.trim().to_owned());
    let resource = env.parsed("OTEL_RESOURCE_ATTRIBUTES", Vec::new(), |raw| {
        parse_pairs(raw).map(|pairs| pairs.into_iter().filter(|(key, _)| key != "service.name").collect())
    })?;
    Ok(Some(OtlpConfig {
        url,
        protocol,
        headers: headers.transpose()?.unwrap_or_default(),
        timeout: timeout.transpose()?.unwrap_or(Duration::from_secs(10)),
        gzip,
        service_name,
        resource,
        sampler: sampler(env)?,
        max_queue,
        max_batch,
        schedule_delay: env.parsed("OTEL_BSP_SCHEDULE_DELAY", Duration::from_secs(5), timeout_millis)?,
        export_timeout: env.parsed("OTEL_BSP_EXPORT_TIMEOUT", Duration::from_secs(30), timeout_millis)?,
    }))
}

/// What is accepted but most likely a slip, for the start's warnings: the gRPC port, or a base
/// endpoint that already ends with the traces path (spans would go to `…/v1/traces/v1/traces`).
pub fn warnings(env: &Env, config: Option<&OtlpConfig>) -> Vec<String> {
    let Some(config) = config else { return Vec::new() };
    let mut warnings = Vec::new();
    if config.url.port() == Some(4317) {
        warnings.push(format!(
            "traces go to {} over HTTP, but 4317 is the OTLP/gRPC port: a collector takes OTLP/HTTP on 4318",
            shown_url(&config.url)
        ));
    }
    let base = env.get(ENDPOINT).ok().flatten().filter(|_| env.get(TRACES_ENDPOINT).ok().flatten().is_none());
    if base.is_some_and(|base| base.trim().trim_end_matches('/').ends_with("/v1/traces")) {
        warnings.push(format!(
            "{ENDPOINT} is the collector's base URL, to which /v1/traces is added: spans go to {}; set \
             {TRACES_ENDPOINT} to give the full URL instead",
            shown_url(&config.url)
        ));
    }
    warnings
}

/// `OTEL_EXPORTER_OTLP_TRACES_<what>`, else `OTEL_EXPORTER_OTLP_<what>`: the variable that
/// was read (for its errors) and its value.
fn signal<'a>(env: &'a Env, what: &str) -> Result<(String, Option<&'a str>), ConfigError> {
    let traces = format!("OTEL_EXPORTER_OTLP_TRACES_{what}");
    if let Some(value) = env.get(&traces)? {
        return Ok((traces, Some(value)));
    }
    let any = format!("OTEL_EXPORTER_OTLP_{what}");
    let value = env.get(&any)?;
    Ok((any, value))
}

/// The traces endpoint under a base endpoint, as the specification builds it: the base's path
/// with `v1/traces` appended (`http://collector:4318` → `http://collector:4318/v1/traces`).
fn traces_url(base: &Url) -> Result<Url, String> {
    let mut url = base.clone();
    let path = format!("{}/v1/traces", base.path().trim_end_matches('/'));
    url.set_path(&path);
    if url.query().is_some() {
        return Err(format!("`{}` has a query; give the base URL of the collector", shown_url(base)));
    }
    Ok(url)
}

/// `key=value,key=value` with percent-encoded values (the W3C Baggage format the specification
/// uses for headers and resource attributes).
fn parse_pairs(raw: &str) -> Result<Vec<(String, String)>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let Some((key, value)) = pair.split_once('=') else {
                return Err("is not a list of key=value pairs separated by commas".to_owned());
            };
            let key = key.trim();
            if key.is_empty() {
                return Err("has a pair with no key before `=`".to_owned());
            }
            let value = url::form_urlencoded::parse(format!("v={}", value.trim().replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default();
            Ok((key.to_owned(), value))
        })
        .collect()
}

/// Headers for every export; values are never quoted back (they often are API keys).
fn parse_headers(raw: &str) -> Result<Vec<(String, Secret)>, String> {
    parse_pairs(raw)?
        .into_iter()
        .map(|(name, value)| {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("`{name}` is not a header name"));
            }
            if axum::http::HeaderValue::from_str(&value).is_err() {
                return Err(format!("the value of header `{name}` cannot be sent in a header"));
            }
            Ok((name, Secret::new(value)))
        })
        .collect()
}

/// Spans held or sent at once: a count a queue can be allocated for.
fn span_count(raw: &str) -> Result<usize, String> {
    match positive_count(raw)? {
        n @ ..=1_000_000 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => Err("must be at most 1000000".into()),
    }
}

fn sampler(env: &Env) -> Result<Sampler, ConfigError> {
    const VAR: &str = "OTEL_TRACES_SAMPLER_ARG";
    let ratio = || -> Result<f64, ConfigError> {
        env.parsed(VAR, 1.0, |raw| match raw.parse::<f64>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
            _ => Err(format!("`{raw}` is not a ratio between 0 and 1")),
        })
    };
    let chosen = env.get("OTEL_TRACES_SAMPLER")?.map(str::trim);
    Ok(match chosen {
        None | Some("parentbased_always_on") => Sampler::ParentBased(RootSampler::AlwaysOn),
        Some("parentbased_always_off") => Sampler::ParentBased(RootSampler::AlwaysOff),
        Some("parentbased_traceidratio") => Sampler::ParentBased(RootSampler::Ratio(ratio()?)),
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::Ratio(ratio()?),
        Some(other) => {
            return Err(ConfigError::new(
                "OTEL_TRACES_SAMPLER",
                format!(
                    "`{other}` is not one of always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off, parentbased_traceidratio"
                ),
            ));
        }
    })
}

/// The effective values for `check-config`: header values hidden, the endpoint's credentials too.
pub fn effective(config: Option<&OtlpConfig>) -> Vec<(String, String)> {
    let Some(config) = config else {
        return vec![(ENDPOINT.to_owned(), "(unset: traces off)".to_owned())];
    };
    let headers = config.headers.iter().map(|(name, _)| format!("{name}={REDACTED}")).collect::<Vec<_>>().join(",");
    vec![
        (TRACES_ENDPOINT.to_owned(), shown_url(&config.url)),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), config.protocol.as_str().to_owned()),
        ("OTEL_EXPORTER_OTLP_HEADERS".to_owned(), if headers.is_empty() { "(unset)".to_owned() } else { headers }),
        ("OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(), config.timeout.as_millis().to_string()),
        ("OTEL_EXPORTER_OTLP_COMPRESSION".to_owned(), if config.gzip { "gzip" } else { "none" }.to_owned()),
        ("OTEL_SERVICE_NAME".to_owned(), config.service_name.clone()),
        ("OTEL_TRACES_SAMPLER".to_owned(), config.sampler.name().to_owned()),
        (
            "OTEL_TRACES_SAMPLER_ARG".to_owned(),
            config.sampler.ratio().map_or_else(|| "(unset)".to_owned(), |r| r.to_string()),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, ConfigError> {
        from_env(&Env::from_pairs(vars.iter().copied()))
    }

    #[test]
    fn traces_are_off_without_an_endpoint_or_when_switched_off() {
        assert_eq!(read(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap(), None);
        let endpoint = (ENDPOINT, "http://collector:4318");
        assert_eq!(read(&[endpoint, ("OTEL_SDK_DISABLED", "true")]).unwrap(), None);
        assert_eq!(read(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(), None);
        assert!(read(&[endpoint]).unwrap().is_some());
    }

    #[test]
    fn the_base_endpoint_gets_the_traces_path_and_the_traces_endpoint_is_taken_as_given() {
        let url = |vars: &[(&str, &str)]| read(vars).unwrap().unwrap().url.to_string();
        assert_eq!(url(&[(ENDPOINT, "http://collector:4318")]), "http://collector:4318/v1/traces");
        assert_eq!(url(&[(ENDPOINT, "https://otel.test/prefix/")]), "https://otel.test/prefix/v1/traces");
        assert_eq!(
            url(&[(ENDPOINT, "http://collector:4318"), (TRACES_ENDPOINT, "http://other:4318/custom")]),
            "http://other:4318/custom"
        );
    }

    #[test]
    fn the_standard_variables_are_read_with_the_signal_specific_ones_first() {
        let config = read(&[
            (ENDPOINT, "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=abc%20def,tenant=acme"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_SERVICE_NAME", "relay-eu"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=ignored"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(config.protocol, OtlpProtocol::Json);
        let headers: Vec<(&str, &str)> = config.headers.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
        assert_eq!(headers, [("x-api-key", "abc def"), ("tenant", "acme")]);
        assert_eq!(config.timeout, Duration::from_millis(2500));
        assert!(config.gzip);
        assert_eq!(config.service_name, "relay-eu");
        assert_eq!(config.resource, [("deployment.environment".to_owned(), "prod".to_owned())]);
        assert_eq!(config.sampler, Sampler::ParentBased(RootSampler::Ratio(0.25)));
        assert_eq!((config.max_queue, config.max_batch), (100, 100));
        assert_eq!(config.schedule_delay, Duration::from_millis(200));
    }

    #[test]
    fn mistakes_are_refused_naming_the_variable_and_never_quoting_a_header_value() {
        let endpoint = (ENDPOINT, "http://collector:4318");
        let refused = |vars: &[(&str, &str)]| read(vars).unwrap_err().to_string();
        let grpc = refused(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        assert!(grpc.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL: grpc is not supported"), "{grpc}");
        assert!(grpc.contains("4318"), "{grpc}");
        assert!(refused(&[(ENDPOINT, "collector:4318")]).starts_with(ENDPOINT));
        assert!(refused(&[(ENDPOINT, "http://otel.example.com")]).contains("reserved for documentation"));
        let header = refused(&[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-api-key=sec\u{7f}ret-value")]);
        assert!(header.starts_with("OTEL_EXPORTER_OTLP_TRACES_HEADERS"), "{header}");
        assert!(!header.contains("ret-value"), "{header}");
        assert!(refused(&[endpoint, ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign")]).contains("key=value"));
        assert!(refused(&[endpoint, ("OTEL_TRACES_SAMPLER", "sometimes")]).starts_with("OTEL_TRACES_SAMPLER:"));
        assert!(
            refused(&[endpoint, ("OTEL_TRACES_SAMPLER_ARG", "2"), ("OTEL_TRACES_SAMPLER", "traceidratio")])
                .starts_with("OTEL_TRACES_SAMPLER_ARG:")
        );
        assert!(refused(&[endpoint, ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")]).contains("gzip or none"));
        assert!(refused(&[endpoint, ("OTEL_TRACES_EXPORTER", "jaeger")]).contains("otlp"));
        assert!(refused(&[endpoint, ("OTEL_SDK_DISABLED", "yes")]).starts_with("OTEL_SDK_DISABLED"));
        for size in ["0", "1000001"] {
            assert!(refused(&[endpoint, ("OTEL_BSP_MAX_QUEUE_SIZE", size)]).starts_with("OTEL_BSP_MAX_QUEUE_SIZE"));
        }
        let batch = refused(&[endpoint, ("OTEL_BSP_MAX_QUEUE_SIZE", "10"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "11")]);
        assert!(batch.contains("at most OTEL_BSP_MAX_QUEUE_SIZE (10)"), "{batch}");
        let ca = refused(&[endpoint, ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ssl/collector-ca.pem")]);
        assert!(ca.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE: is not supported"), "{ca}");
        // Off, nothing of it is read.
        assert_eq!(read(&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ssl/collector-ca.pem")]).unwrap(), None);
    }

    #[test]
    fn the_grpc_port_and_a_doubled_traces_path_are_warned_about() {
        let warned = |vars: &[(&str, &str)]| {
            let env = Env::from_pairs(vars.iter().copied());
            warnings(&env, from_env(&env).unwrap().as_ref())
        };
        assert!(warned(&[(ENDPOINT, "http://collector:4318")]).is_empty());
        assert!(warned(&[(ENDPOINT, "http://collector:4317")])[0].contains("4318"));
        let doubled = warned(&[(ENDPOINT, "http://collector:4318/v1/traces")]);
        assert!(doubled[0].contains("http://collector:4318/v1/traces/v1/traces"), "{doubled:?}");
        assert!(warned(&[(TRACES_ENDPOINT, "http://collector:4318/v1/traces")]).is_empty());
    }

    #[test]
    fn every_variable_read_is_documented_in_the_readme() {
        let readme = include_str!("../../README.md");
        // The signal-specific forms are documented once, by the rule that they win.
        let by_rule = |var: &str| {
            readme.contains("each `OTEL_EXPORTER_OTLP_TRACES_*` winning over its `OTEL_EXPORTER_OTLP_*`")
                && var
                    .strip_prefix("OTEL_EXPORTER_OTLP_TRACES_")
                    .is_some_and(|what| readme.contains(&format!("`OTEL_EXPORTER_OTLP_{what}`")))
        };
        for var in VARS.iter().chain(REFUSED_VARS) {
            assert!(readme.contains(var) || by_rule(var), "{var} is not in the README");
        }
    }

    #[test]
    fn check_config_hides_header_values() {
        let config = read(&[
            (ENDPOINT, "http://u:p@collector:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20s3cr3t"),
        ])
        .unwrap();
        let shown = format!("{:?}", effective(config.as_ref()));
        assert!(!shown.contains("s3cr3t") && !shown.contains(":p@"), "{shown}");
        assert!(shown.contains("authorization=[redacted]"), "{shown}");
        assert!(shown.contains(r#"("OTEL_TRACES_SAMPLER", "parentbased_always_on")"#), "{shown}");
        let ratio = read(&[
            (ENDPOINT, "http://c:4318"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
        ]);
        let shown = format!("{:?}", effective(ratio.unwrap().as_ref()));
        assert!(
            shown.contains(r#"("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.5")"#),
            "{shown}"
        );
    }
}
