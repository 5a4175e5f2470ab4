//! `paystream.toml`: defaults → the file → `PAYSTREAM__SECTION__KEY` environment variables, validated at start
//! with errors that name the key. `paystream.example.toml` documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::Deserialize;

/// The whole configuration of every role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: storage::DbConfig,
    #[serde(default)]
    pub nats: bus::NatsConfig,
    #[serde(default)]
    pub consumer: bus::ConsumerConfig,
    #[serde(default)]
    pub outbox: bus::OutboxConfig,
    #[serde(default)]
    pub telemetry: observability::TelemetryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The HTTP API; needed by the ingress.
    pub http: Option<ingress::IngressConfig>,
    /// WeChat Pay and the mini-program; needed by the roles that talk to WeChat.
    pub wechat: Option<wechat::WechatConfig>,
    /// Tencent Cloud SMS; needed by the notifier when SMS is used.
    pub sms: Option<wechat::SmsConfig>,
    /// Closing unpaid orders past their deadline (the lifecycle processor).
    #[serde(default)]
    pub timeout: processors::TimeoutConfig,
    /// Asking WeChat about payments still waiting (the lifecycle processor).
    #[serde(default)]
    pub reconcile: processors::ReconcileConfig,
    /// Refunds: asking WeChat about refunds it has not settled (the lifecycle processor).
    #[serde(default)]
    pub refund: processors::RefundConfig,
    /// Subscribe messages and SMS: templates and the mini-program environment; needed by the notifier.
    pub notifier: Option<notifier::NotifierConfig>,
}

/// `[admin]`: where a role serves `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: "127.0.0.1:9090".parse().expect("valid address") }
    }
}

/// A configuration that cannot be used, with the key at fault in the message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where the file comes from: `--config`, else `PAYSTREAM_CONFIG`, else `./paystream.toml` when present.
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PAYSTREAM_CONFIG").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from("paystream.toml")).filter(|p| p.exists()))
}

/// figment reports every error with the key path it came from; one per line.
fn parse_error(e: figment::Error) -> ConfigError {
    ConfigError::Parse(e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
}

/// The keys taken from the environment as they are written (see [`strings_from_env`]): the secrets, and the ids that
/// may be all digits (a merchant id read as TOML is a number, and refused).
const STRING_KEYS: &[&str] = &[
    "database.url",
    "nats.password",
    "nats.token",
    "http.jwt_secret",
    "wechat.apiv3_key",
    "wechat.miniprogram_secret",
    "wechat.mchid",
    "wechat.appid",
    "wechat.merchant_serial_no",
    "sms.secret_id",
    "sms.secret_key",
    "sms.sdk_app_id",
];

/// `PAYSTREAM__SECTION__KEY` → `section.key`.
fn env() -> Env {
    Env::prefixed("PAYSTREAM__").split("__")
}

/// The string key an environment key sets, and whether it names a file holding the value (`…_FILE`).
fn string_key(env_key: &str) -> Option<(&'static str, bool)> {
    let key = env_key.to_ascii_lowercase();
    let (key, file) = match key.strip_suffix("_file") {
        Some(stem) => (stem, true),
        None => (key.as_str(), false),
    };
    STRING_KEYS.iter().find(|k| **k == key).map(|k| (*k, file))
}

/// Sets the [`STRING_KEYS`] given in the environment, over the file: `PAYSTREAM__HTTP__JWT_SECRET` holds the value
/// itself and `PAYSTREAM__HTTP__JWT_SECRET_FILE` the path of a file holding it (a mounted Kubernetes or Docker
/// secret; one trailing newline is dropped).
///
/// Written by hand because figment's `Env` reads every value as TOML: a secret of digits became a number and was
/// refused (with the secret itself in the error message), and a secret in quotes lost them. These keys are taken as
/// written, always strings, and an error names the variable, never the value.
///
/// Keys of the `unused` sections are skipped: a role does not read another role's secret files.
fn strings_from_env(mut figment: Figment, unused: &[&str]) -> Result<Figment, ConfigError> {
    let mut seen: Vec<(&str, String)> = Vec::new();
    for (env_key, raw) in env().iter() {
        let Some((key, from_file)) = string_key(env_key.as_str()) else { continue };
        if unused.iter().any(|u| *u == key || key.split('.').next() == Some(*u)) {
            continue;
        }
        let var = format!("PAYSTREAM__{}", env_key.as_str().to_ascii_uppercase().replace('.', "__"));
        if let Some((_, other)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(ConfigError::Invalid(format!("{key} is set twice, by {other} and by {var}: keep one")));
        }
        let value = if from_file {
            let mut text = std::fs::read_to_string(&raw)
                .map_err(|e| ConfigError::Invalid(format!("{key}: {var} names {raw}, which cannot be read: {e}")))?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            text
        } else {
            raw
        };
        figment = figment.merge(figment::providers::Serialized::default(key, value));
        seen.push((key, var));
    }
    Ok(figment)
}

impl Config {
    /// Loads and validates every section (the configuration of `paystream all`). `path` must exist when given.
    #[cfg(test)]
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_for(path, &[])
    }

    /// Loads from a TOML string alone (no environment), for tests.
    #[cfg(test)]
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)), &[])
    }

    /// As [`Config::load`] for a role that does not use the sections or keys named in `unused` (a section: `http`,
    /// `wechat`, `sms`, `notifier`; a key: `wechat.apiv3_key`, `wechat.miniprogram_secret`): they are left out before
    /// parsing, so the role neither
    /// needs nor holds their secrets (the relay has no JWT key, the ingress no SMS key, the payment processor no
    /// APIv3 key) even when one shared `paystream.toml` has every section. Those two WeChat secrets, optional in
    /// `WechatConfig` because not every role using `[wechat]` needs them, are required unless left out.
    pub fn load_for(path: Option<&Path>, unused: &[&str]) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError::Missing(p.to_path_buf()));
            }
            figment = figment.merge(Toml::file_exact(p));
        }
        let figment = figment.merge(env().filter(|key| string_key(key.as_str()).is_none()));
        let figment = strings_from_env(figment, unused)?;
        if unused.is_empty() {
            // Straight from the sources: figment's errors then also say which file or variable a value came from.
            return Self::from_figment(figment, unused);
        }
        let mut all: figment::value::Dict = figment.extract().map_err(parse_error)?;
        for entry in unused {
            match entry.split_once('.') {
                None => {
                    all.remove(*entry);
                }
                Some((section, key)) => {
                    if let Some(figment::value::Value::Dict(_, dict)) = all.get_mut(section) {
                        dict.remove(key);
                    }
                }
            }
        }
        Self::from_figment(Figment::from(figment::providers::Serialized::defaults(all)), unused)
    }

    fn from_figment(figment: Figment, unused: &[&str]) -> Result<Config, ConfigError> {
        let cfg: Config = figment.extract().map_err(parse_error)?;
        cfg.validate()?;
        let mut missing = Vec::new();
        if let Some(w) = &cfg.wechat {
            for (key, absent) in [
                ("wechat.apiv3_key", w.apiv3_key.is_none()),
                ("wechat.miniprogram_secret", w.miniprogram_secret.is_none()),
            ] {
                if absent && !unused.contains(&key) {
                    missing.push(key);
                }
            }
        }
        if !missing.is_empty() {
            return Err(ConfigError::Invalid(format!("missing secret: {} (this role needs it)", missing.join(", "))));
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |r: Result<(), String>| {
            if let Err(e) = r {
                problems.push(e);
            }
        };
        check(self.database.validate());
        check(self.telemetry.validate());
        check(self.nats.validate());
        check(self.consumer.validate());
        check(self.outbox.validate());
        check(self.timeout.validate().map_err(|e| e.to_string()));
        check(self.reconcile.validate().map_err(|e| e.to_string()));
        check(self.refund.validate());
        if let Some(h) = &self.http {
            check(h.validate());
        }
        if let Some(w) = &self.wechat {
            check(w.validate().map_err(|e| e.to_string()));
        }
        if let Some(s) = &self.sms {
            check(s.validate().map_err(|e| e.to_string()));
        }
        if let Some(n) = &self.notifier {
            check(n.validate(self.sms.is_some()).map_err(|e| e.to_string()));
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems.join("; "))) }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    const MINIMAL: &str = r#"
        [database]
        url = "postgres://postgres@127.0.0.1:5432/paystream"
    "#;

    #[test]
    fn a_minimal_file_gets_sensible_defaults() {
        let cfg = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(cfg.nats.prefix, "paystream");
        assert_eq!(cfg.database.pool_size, 16);
        assert!(cfg.wechat.is_none());
    }

    #[test]
    fn the_example_file_is_valid_and_complete() {
        let example = include_str!("../../paystream.example.toml");
        // Its token key is a placeholder, refused by name until a real one is set (in the environment, ideally).
        let e = Config::from_toml(example).unwrap_err().to_string();
        assert!(e.contains("http.jwt_secret is a placeholder"), "{e}");
        let example = example
            .replace("set-me-in-the-environment-at-least-32-bytes", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c");
        let cfg = Config::from_toml(&example).unwrap_or_else(|e| panic!("paystream.example.toml: {e}"));
        assert!(
            cfg.wechat.is_some() && cfg.sms.is_some() && cfg.http.is_some() && cfg.notifier.is_some(),
            "the example documents every section"
        );
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let e = Config::from_toml(&format!("{MINIMAL}\n[nats]\nprefx = \"x\"\n")).unwrap_err().to_string();
        assert!(e.contains("prefx") && e.contains("nats"), "{e}");
    }

    #[test]
    fn a_missing_secret_is_refused_by_name() {
        let e = Config::from_toml("[nats]\nprefix = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("database"), "{e}");
        let e = Config::from_toml("[database]\npool_size = 4\n").unwrap_err().to_string();
        assert!(e.contains("url") && e.contains("database"), "{e}");
    }

    #[test]
    fn ack_wait_shorter_than_the_handler_timeout_is_refused() {
        let e = Config::from_toml(&format!("{MINIMAL}\n[consumer]\nack_wait = \"5s\"\nhandler_timeout = \"10s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("consumer.ack_wait") && e.contains("consumer.handler_timeout"), "{e}");
    }

    #[test]
    fn a_bad_duration_names_its_key() {
        let e = Config::from_toml(&format!("{MINIMAL}\n[outbox]\npoll_interval = \"soon\"\n")).unwrap_err().to_string();
        assert!(e.contains("poll_interval"), "{e}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
    fn the_environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("paystream.toml", &format!("{MINIMAL}\n[nats]\nprefix = \"fromfile\"\n"))?;
            jail.set_env("PAYSTREAM__NATS__PREFIX", "fromenv");
            jail.set_env("PAYSTREAM__CONSUMER__MAX_DELIVER", "12");
            let cfg = Config::load(Some(Path::new("paystream.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(cfg.nats.prefix, "fromenv");
            assert_eq!(cfg.consumer.max_deliver, 12);
            jail.set_env("PAYSTREAM__NATS__PREFIX", "a.b");
            let e = Config::load(Some(Path::new("paystream.toml"))).unwrap_err().to_string();
            assert!(e.contains("nats.prefix"), "{e}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
    fn a_role_is_given_only_the_sections_it_uses_and_needs_only_their_secrets() {
        figment::Jail::expect_with(|jail| {
            // A shared file with an [http] and [sms] section whose secrets this role is not given.
            jail.create_file(
                "paystream.toml",
                &format!("{MINIMAL}\n[http]\nlisten = \"127.0.0.1:8080\"\n[sms]\nsdk_app_id = \"1400000000\"\n"),
            )?;
            let path = Some(Path::new("paystream.toml"));
            let e = Config::load(path).unwrap_err().to_string();
            assert!(e.contains("jwt_secret"), "every section is checked when all are used: {e}");
            let relay = Config::load_for(path, &["http", "wechat", "sms", "notifier"]).map_err(|e| e.to_string())?;
            assert!(relay.http.is_none() && relay.sms.is_none());
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c");
            let ingress = Config::load_for(path, &["sms", "notifier"]).map_err(|e| e.to_string())?;
            assert!(ingress.http.is_some() && ingress.sms.is_none());
            jail.set_env("PAYSTREAM__NATS__PREFIX", "a.b");
            let e = Config::load_for(path, &["sms"]).unwrap_err().to_string();
            assert!(e.contains("nats.prefix"), "kept sections are validated as before: {e}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
    fn secrets_and_ids_in_the_environment_are_taken_as_written() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "paystream.toml",
                &format!(
                    "{MINIMAL}\n[http]\nlisten = \"127.0.0.1:8080\"\njwt_secret = \"from-the-file-7f3a9c2e1b5d80466e2d\"\n"
                ),
            )?;
            let path = Some(Path::new("paystream.toml"));
            // All digits (TOML would make it a number, refused with the secret in the message), and quoted.
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET", "27182818284590452353602874713526624977");
            let cfg = Config::load(path).map_err(|e| e.to_string())?;
            assert_eq!(cfg.http.as_ref().unwrap().jwt_secret.expose_secret(), "27182818284590452353602874713526624977");
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET", "\"quoted-secret-quoted-secret-quoted\"");
            let cfg = Config::load(path).map_err(|e| e.to_string())?;
            assert_eq!(cfg.http.as_ref().unwrap().jwt_secret.expose_secret(), "\"quoted-secret-quoted-secret-quoted\"");
            // A digits-only secret that is too short is refused by key, without the value.
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET", "31415926");
            let e = Config::load(path).unwrap_err().to_string();
            assert!(e.contains("http.jwt_secret") && !e.contains("31415926"), "{e}");
            // From a file (a mounted secret): one trailing newline dropped.
            jail.create_file("jwt", "3141592653589793238462643383279502884197\n")?;
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET_FILE", "jwt");
            let e = Config::load(path).unwrap_err().to_string();
            assert!(e.contains("set twice") && e.contains("PAYSTREAM__HTTP__JWT_SECRET_FILE"), "{e}");
            jail.clear_env();
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET_FILE", "jwt");
            let cfg = Config::load(path).map_err(|e| e.to_string())?;
            assert_eq!(
                cfg.http.as_ref().unwrap().jwt_secret.expose_secret(),
                "3141592653589793238462643383279502884197"
            );
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET_FILE", "/nonexistent/jwt");
            let e = Config::load(path).unwrap_err().to_string();
            assert!(e.contains("http.jwt_secret") && e.contains("/nonexistent/jwt"), "{e}");
            // A role without [http] does not read the ingress's secret file.
            let relay = Config::load_for(path, &["http", "wechat", "sms", "notifier"]).map_err(|e| e.to_string())?;
            assert!(relay.http.is_none());
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
    fn a_role_holds_only_the_wechat_secrets_it_uses() {
        figment::Jail::expect_with(|jail| {
            let example = include_str!("../../paystream.example.toml");
            jail.create_file("paystream.toml", example)?;
            let path = Some(Path::new("paystream.toml"));
            let payment = ["http", "sms", "notifier", "wechat.apiv3_key", "wechat.miniprogram_secret"];
            let cfg = Config::load_for(path, &payment).map_err(|e| e.to_string())?;
            let w = cfg.wechat.as_ref().unwrap();
            assert!(w.apiv3_key.is_none() && w.miniprogram_secret.is_none(), "given in the file, yet not held");
            assert_eq!(w.mchid, "1900000001");
            // The environment's copy is not read either.
            jail.set_env("PAYSTREAM__WECHAT__APIV3_KEY_FILE", "/nonexistent/apiv3_key");
            Config::load_for(path, &payment).map_err(|e| e.to_string())?;
            jail.clear_env();
            jail.set_env("PAYSTREAM__HTTP__JWT_SECRET", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c");
            // Without the APIv3 key in the file: fine for the notifier, refused by name for the roles that need it.
            let without = example.replace("apiv3_key = \"set-me-in-the-environment-32byte\"\n", "");
            assert_ne!(without, example);
            jail.create_file("paystream.toml", &without)?;
            Config::load_for(path, &["http", "wechat.apiv3_key"]).map_err(|e| e.to_string())?;
            let e = Config::load(path).unwrap_err().to_string();
            assert!(e.contains("missing secret: wechat.apiv3_key"), "{e}");
            let e = Config::load_for(path, &["http", "sms", "notifier", "wechat.miniprogram_secret"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("wechat.apiv3_key"), "the lifecycle processor needs it: {e}");
            Ok(())
        });
    }

    #[test]
    fn a_named_file_that_does_not_exist_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/paystream.toml"))).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/paystream.toml"), "{e}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let cfg = Config::from_toml("[database]\nurl = \"postgres://u:hunter2@db/x\"\n").unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
