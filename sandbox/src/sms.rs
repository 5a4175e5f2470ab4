//! Tencent Cloud SMS `SendSms` (API 2021-01-11) with its TC3-HMAC-SHA256 signature check.
//! The check is written here from Tencent's published algorithm, not borrowed from the
//! merchant side, so a signing bug there cannot hide behind the same bug here.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::DateTime;
use serde::Serialize;
use serde_json::{Value, json};

use crate::faults::Api;
use crate::server::{Shared, lock};
use crate::util::{self, hmac_sha256, sha256};

/// An accepted `SendSms`, as `GET /sandbox/v1/sms` lists it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SmsRecord {
    pub request_id: String,
    pub phone_numbers: Vec<String>,
    pub template_id: String,
    pub template_params: Vec<String>,
    pub sign_name: String,
    pub sdk_app_id: String,
    /// `Code` answered per number, in order.
    pub codes: Vec<String>,
    pub at: String,
}

fn error(code: &str, message: &str) -> Json<Value> {
    Json(
        json!({"Response": {"Error": {"Code": code, "Message": message}, "RequestId": uuid::Uuid::new_v4().to_string()}}),
    )
}

/// The parts of `Authorization: TC3-HMAC-SHA256 Credential=ID/DATE/SERVICE/tc3_request,
/// SignedHeaders=a;b, Signature=HEX`.
struct Tc3Auth<'a> {
    secret_id: &'a str,
    date: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_auth(value: &str) -> Option<Tc3Auth<'_>> {
    let rest = value.trim().strip_prefix("TC3-HMAC-SHA256")?.trim_start();
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k.trim() {
            "Credential" => credential = Some(v.trim()),
            "SignedHeaders" => signed_headers = Some(v.trim()),
            "Signature" => signature = Some(v.trim()),
            _ => return None,
        }
    }
    let mut scope = credential?.split('/');
    let secret_id = scope.next()?;
    let date = scope.next()?;
    let service = scope.next()?;
    if scope.next()? != "tc3_request" || scope.next().is_some() {
        return None;
    }
    Some(Tc3Auth { secret_id, date, service, signed_headers: signed_headers?, signature: signature? })
}

/// TC3 signature of a POST to `/` with an empty query, over the headers named in
/// `signed_headers`. `lower_values` picks between header values lower-cased (Tencent's doc)
/// and as sent (what several SDKs do); the sandbox accepts either.
fn tc3_signature(
    secret_key: &str,
    headers: &HeaderMap,
    auth: &Tc3Auth<'_>,
    timestamp: &str,
    body: &[u8],
    lower_values: bool,
) -> Option<String> {
    let mut canonical_headers = String::new();
    for name in auth.signed_headers.split(';') {
        let value = headers.get(name)?.to_str().ok()?.trim();
        let value = if lower_values { value.to_ascii_lowercase() } else { value.to_owned() };
        canonical_headers.push_str(&format!("{}:{}\n", name.to_ascii_lowercase(), value));
    }
    let canonical_request =
        format!("POST\n/\n\n{canonical_headers}\n{}\n{}", auth.signed_headers, hex::encode(sha256(body)));
    let scope = format!("{}/{}/tc3_request", auth.date, auth.service);
    let string_to_sign =
        format!("TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{}", hex::encode(sha256(canonical_request.as_bytes())));
    let k_date = hmac_sha256(format!("TC3{secret_key}").as_bytes(), auth.date.as_bytes());
    let k_service = hmac_sha256(&k_date, auth.service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"tc3_request");
    Some(hex::encode(hmac_sha256(&k_signing, string_to_sign.as_bytes())))
}

/// Whether `n` looks like a number Tencent would send to: E.164 (`+` and 8 to 15 digits) or a
/// mainland mobile number without the country code.
fn phone_ok(n: &str) -> bool {
    match n.strip_prefix('+') {
        Some(d) => (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()),
        None => n.len() == 11 && n.starts_with('1') && n.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// `POST /`: the Tencent Cloud API entry; only `X-TC-Action: SendSms` is served.
pub(crate) async fn tencent_api(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Json<Value> {
    shared.injected_latency(Api::SmsSend).await;
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(auth) = parse_auth(header("authorization")) else {
        return error("AuthFailure.InvalidAuthorization", "Authorization header is missing or malformed.");
    };
    let timestamp = header("x-tc-timestamp");
    let Ok(ts) = timestamp.parse::<i64>() else {
        return error("MissingParameter", "The request is missing a required parameter `X-TC-Timestamp`.");
    };
    if (util::unix_now() - ts).abs() > 300 {
        return error(
            "AuthFailure.SignatureExpire",
            "The signature expired: X-TC-Timestamp is more than 5 minutes off.",
        );
    }
    let date_ok = DateTime::from_timestamp(ts, 0).is_some_and(|t| t.format("%Y-%m-%d").to_string() == auth.date);
    if !date_ok || auth.service != "sms" {
        return error(
            "AuthFailure.InvalidAuthorization",
            "Credential scope must be DATE(UTC of X-TC-Timestamp)/sms/tc3_request.",
        );
    }
    if auth.secret_id != shared.identity.sms_secret_id {
        return error("AuthFailure.SecretIdNotFound", "The SecretId is not found.");
    }
    let signed = auth.signed_headers.split(';').collect::<Vec<_>>();
    if !signed.contains(&"content-type") || !signed.contains(&"host") {
        return error("AuthFailure.InvalidAuthorization", "SignedHeaders must include content-type and host.");
    }
    let key = &shared.identity.sms_secret_key;
    let matches = [true, false].into_iter().any(|lower| {
        tc3_signature(key, &headers, &auth, timestamp, &body, lower)
            .is_some_and(|sig| constant_time_eq(sig.as_bytes(), auth.signature.as_bytes()))
    });
    if !matches {
        return error("AuthFailure.SignatureFailure", "The provided credentials could not be validated.");
    }
    let action = header("x-tc-action");
    if action != "SendSms" {
        return error("InvalidAction", &format!("The action `{action}` is invalid."));
    }
    if header("x-tc-version") != "2021-01-11" {
        return error("NoSuchVersion", "The requested version `X-TC-Version` does not exist (expected 2021-01-11).");
    }
    if header("x-tc-region").is_empty() {
        return error("MissingParameter", "The request is missing a required parameter `X-TC-Region`.");
    }
    if let Some(spec) = shared.take_fail(Api::SmsSend) {
        return error(
            spec.code.as_deref().unwrap_or("InternalError"),
            spec.message.as_deref().unwrap_or("An internal error occurred (injected fault)."),
        );
    }
    send_sms(&shared, &body)
}

fn send_sms(shared: &Shared, body: &[u8]) -> Json<Value> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error("InvalidParameter", "The request body is not valid JSON.");
    };
    let strings = |k: &str| -> Option<Vec<String>> {
        v.get(k)?.as_array()?.iter().map(|x| x.as_str().map(str::to_owned)).collect()
    };
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let Some(numbers) = strings("PhoneNumberSet").filter(|n| !n.is_empty()) else {
        return error("MissingParameter", "The request is missing a required parameter `PhoneNumberSet`.");
    };
    if numbers.len() > 200 {
        return error("LimitExceeded.PhoneNumberCountLimit", "At most 200 numbers per request.");
    }
    if field("SmsSdkAppId") != shared.identity.sms_sdk_app_id {
        return error("InvalidParameterValue.SdkAppIdNotExist", "SdkAppId does not exist.");
    }
    if field("SignName") != shared.identity.sms_sign_name {
        return error("FailedOperation.SignatureIncorrectOrUnapproved", "The signature is incorrect or unapproved.");
    }
    let template_id = field("TemplateId");
    if template_id.is_empty() {
        return error("MissingParameter", "The request is missing a required parameter `TemplateId`.");
    }
    let params = match v.get("TemplateParamSet") {
        None | Some(Value::Null) => Vec::new(),
        Some(_) => match strings("TemplateParamSet") {
            Some(p) => p,
            None => {
                return error(
                    "InvalidParameterValue.TemplateParameterFormatError",
                    "TemplateParamSet must be strings.",
                );
            }
        },
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let statuses: Vec<Value> = numbers
        .iter()
        .map(|n| {
            let (code, message) = if phone_ok(n) {
                ("Ok", "send success")
            } else {
                ("InvalidParameterValue.IncorrectPhoneNumber", "incorrect phone number")
            };
            json!({
                "SerialNo": format!("5000:{}", util::random_string(util::DIGITS, 28)),
                "PhoneNumber": if n.starts_with('+') { n.clone() } else { format!("+86{n}") },
                "Fee": u32::from(code == "Ok"),
                "SessionContext": field("SessionContext"),
                "Code": code,
                "Message": message,
                "IsoCode": if n.starts_with("+86") || !n.starts_with('+') { "CN" } else { "" },
            })
        })
        .collect();
    lock(&shared.sms).push(SmsRecord {
        request_id: request_id.clone(),
        phone_numbers: numbers,
        template_id: template_id.to_owned(),
        template_params: params,
        sign_name: field("SignName").to_owned(),
        sdk_app_id: field("SmsSdkAppId").to_owned(),
        codes: statuses.iter().map(|s| s["Code"].as_str().unwrap_or_default().to_owned()).collect(),
        at: util::now_wechat_time(),
    });
    Json(json!({"Response": {"SendStatusSet": statuses, "RequestId": request_id}}))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tencent's documented example (CVM DescribeInstances, 2019-02-25); also reproduced with
    /// Python hashlib/hmac.
    #[test]
    fn tc3_matches_tencents_published_example() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json; charset=utf-8".parse().unwrap());
        headers.insert("host", "cvm.tencentcloudapi.com".parse().unwrap());
        let auth = Tc3Auth {
            secret_id: "AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******",
            date: "2019-02-25",
            service: "cvm",
            signed_headers: "content-type;host",
            signature: "",
        };
        let body = br#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        let sig = tc3_signature("Gu5t9xGARNpq86cd98joQYCN3*******", &headers, &auth, "1551113065", body, true).unwrap();
        assert_eq!(sig, "2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c");
    }

    #[test]
    fn phone_numbers() {
        assert!(phone_ok("+8613800138000"));
        assert!(phone_ok("13800138000"));
        assert!(!phone_ok("+86abc"));
        assert!(!phone_ok("12345"));
    }
}
