//! WeChat Pay's field rules, checked before a request leaves so that a bad value fails fast
//! and locally (with the field named) instead of as a 400 PARAM_ERROR after a round trip.

/// A field that breaks WeChat's rules.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field} {rule}")]
pub struct FieldError {
    pub field: &'static str,
    pub rule: &'static str,
}

fn check(ok: bool, field: &'static str, rule: &'static str) -> Result<(), FieldError> {
    if ok { Ok(()) } else { Err(FieldError { field, rule }) }
}

fn is_trade_no_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'|' | b'*')
}

/// `out_trade_no`: 6 to 32 of `[0-9a-zA-Z_-|*]`.
pub fn out_trade_no(v: &str) -> Result<(), FieldError> {
    check(
        (6..=32).contains(&v.len()) && v.bytes().all(is_trade_no_char),
        "out_trade_no",
        "must be 6 to 32 characters of [0-9a-zA-Z_-|*]",
    )
}

/// `out_refund_no`: 1 to 64 of `[0-9a-zA-Z_-|*@]`.
pub fn out_refund_no(v: &str) -> Result<(), FieldError> {
    check(
        (1..=64).contains(&v.len()) && v.bytes().all(|b| is_trade_no_char(b) || b == b'@'),
        "out_refund_no",
        "must be 1 to 64 characters of [0-9a-zA-Z_-|*@]",
    )
}

/// `transaction_id`: WeChat's order number (28 digits today; 1 to 32 accepted).
pub fn transaction_id(v: &str) -> Result<(), FieldError> {
    check(
        (1..=32).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()),
        "transaction_id",
        "must be 1 to 32 digits",
    )
}

/// `description`: 1 to 127 characters.
pub fn description(v: &str) -> Result<(), FieldError> {
    check(!v.is_empty() && v.chars().count() <= 127, "description", "must be 1 to 127 characters")
}

/// `attach`: at most 128 characters.
pub fn attach(v: &str) -> Result<(), FieldError> {
    check(v.chars().count() <= 128, "attach", "must be at most 128 characters")
}

/// `reason` of a refund: at most 80 characters.
pub fn refund_reason(v: &str) -> Result<(), FieldError> {
    check(v.chars().count() <= 80, "reason", "must be at most 80 characters")
}

/// `amount.total` and friends: at least 1 fen.
pub fn amount(field: &'static str, fen: i64) -> Result<(), FieldError> {
    check(fen >= 1, field, "must be at least 1 (fen)")
}

/// `time_expire`: RFC 3339.
pub fn time_expire(v: &str) -> Result<(), FieldError> {
    check(
        chrono::DateTime::parse_from_rfc3339(v).is_ok(),
        "time_expire",
        "must be an RFC 3339 time such as 2026-11-27T12:00:00+08:00",
    )
}

/// `appid` / `mchid`: 1 to 32 characters.
pub fn id32(field: &'static str, v: &str) -> Result<(), FieldError> {
    check(
        (1..=32).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        field,
        "must be 1 to 32 letters or digits",
    )
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `notify_url`: https, at most 255 characters, no query string; `http://` on a loopback host
/// only when `allow_insecure_loopback` (development against the sandbox), or on a host named in
/// `insecure_http_hosts` (the sandbox in a development cluster calling the ingress's Service).
pub fn notify_url(v: &str, allow_insecure_loopback: bool, insecure_http_hosts: &[String]) -> Result<(), &'static str> {
    if v.len() > 255 {
        return Err("must be at most 255 characters");
    }
    let url = reqwest::Url::parse(v).map_err(|_| "must be an absolute URL")?;
    if url.query().is_some() || v.contains('?') {
        return Err("must not carry a query string");
    }
    if url.fragment().is_some() {
        return Err("must not carry a fragment");
    }
    let host = url.host_str().ok_or("must have a host")?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure_loopback && is_loopback_host(host) => Ok(()),
        "http" if is_insecure_http_host(host, insecure_http_hosts) => Ok(()),
        "http" if is_loopback_host(host) => {
            Err("must be https (set allow_insecure_loopback for http on loopback in development)")
        }
        _ => Err("must be https"),
    }
}

/// A base URL: https, or http on a loopback host (the sandbox; requests are signed and answers
/// verified either way, and loopback traffic does not leave the machine) or on a host named in
/// `insecure_http_hosts` (the sandbox's Service in a development cluster).
pub fn base_url(v: &str, insecure_http_hosts: &[String]) -> Result<(), &'static str> {
    let url = reqwest::Url::parse(v).map_err(|_| "must be an absolute URL")?;
    let host = url.host_str().ok_or("must have a host")?;
    if url.query().is_some() {
        return Err("must not carry a query string");
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(host) || is_insecure_http_host(host, insecure_http_hosts) => Ok(()),
        _ => Err("must be https (http only on loopback or a host in insecure_http_hosts)"),
    }
}

fn is_insecure_http_host(host: &str, insecure_http_hosts: &[String]) -> bool {
    insecure_http_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// `insecure_http_hosts`: bare host names (no scheme, port or path), for development clusters only.
pub fn insecure_http_hosts(hosts: &[String]) -> Result<(), &'static str> {
    let bare =
        |h: &String| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if hosts.iter().all(bare) { Ok(()) } else { Err("must list bare host names (no scheme, port or path)") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_trade_no_rules() {
        assert!(out_trade_no("ab_-|*").is_ok());
        assert!(out_trade_no(&"a".repeat(32)).is_ok());
        assert!(out_trade_no("abcde").is_err());
        assert!(out_trade_no(&"a".repeat(33)).is_err());
        assert!(out_trade_no("abcdef/").is_err());
        assert!(out_trade_no("订单号123456").is_err());
    }

    #[test]
    fn description_counts_characters_not_bytes() {
        assert!(description(&"支".repeat(127)).is_ok());
        assert!(description(&"支".repeat(128)).is_err());
        assert!(description("").is_err());
    }

    #[test]
    fn notify_url_rules() {
        assert!(notify_url("https://pay.example.com/wechat/notify", false, &[]).is_ok());
        assert!(notify_url("https://pay.example.com/n?x=1", false, &[]).is_err());
        assert!(notify_url("https://pay.example.com/n?", false, &[]).is_err());
        assert!(notify_url("http://pay.example.com/n", true, &[]).is_err());
        assert!(notify_url("http://127.0.0.1:8080/n", false, &[]).is_err());
        assert!(notify_url("http://127.0.0.1:8080/n", true, &[]).is_ok());
        assert!(notify_url("http://[::1]:8080/n", true, &[]).is_ok());
        assert!(notify_url("http://localhost/n", true, &[]).is_ok());
        assert!(notify_url(&format!("https://a.com/{}", "x".repeat(250)), false, &[]).is_err());
        assert!(notify_url("not a url", false, &[]).is_err());
        let ingress = ["paystream-ingress".to_owned()];
        assert!(notify_url("http://paystream-ingress:8080/n", false, &ingress).is_ok());
        assert!(notify_url("http://paystream-ingress.example:8080/n", false, &ingress).is_err());
    }

    #[test]
    fn base_url_rules() {
        assert!(base_url("https://api.mch.weixin.qq.com", &[]).is_ok());
        assert!(base_url("http://127.0.0.1:9000", &[]).is_ok());
        assert!(base_url("http://api.mch.weixin.qq.com", &[]).is_err());
        let sandbox = ["wechat-sandbox".to_owned()];
        assert!(base_url("http://wechat-sandbox:8090", &sandbox).is_ok());
        assert!(base_url("http://WeChat-Sandbox:8090", &sandbox).is_ok());
        assert!(base_url("http://wechat-sandbox.evil.example:8090", &sandbox).is_err());
        assert!(base_url("http://api.mch.weixin.qq.com", &sandbox).is_err());
        assert!(insecure_http_hosts(&sandbox).is_ok());
        assert!(insecure_http_hosts(&["http://wechat-sandbox".to_owned()]).is_err());
        assert!(insecure_http_hosts(&["wechat-sandbox:8090".to_owned()]).is_err());
        assert!(insecure_http_hosts(&[String::new()]).is_err());
    }
}
