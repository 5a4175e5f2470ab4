use reqwest::StatusCode;
use serde_json::{Value, json};

use std::time::Duration;

use crate::common::{Options, spawn_app, spawn_app_with};

const CREATE: &str = "/order/v1/homestayOrder/createHomestayOrder";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_clear_json_errors() {
    let app = spawn_app().await;
    let token = app.wx_login("alice").await;
    let t = Some(token.as_str());
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST, "not valid JSON"),
        (b"[1,2]".to_vec(), StatusCode::BAD_REQUEST, "invalid request body"),
        (
            br#"{"homestayId":"one","liveStartTime":1,"liveEndTime":2,"livePeopleNum":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            br#"{"homestayId":1,"liveEndTime":2,"livePeopleNum":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "missing field `liveStartTime`",
        ),
        (
            br#"{"homestayId":1,"liveStartTime":1,"liveEndTime":2,"livePeopleNum":1,"colour":"red"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            br#"{"homestayId":1,"liveStartTime":1,"liveEndTime":2,"livePeopleNum":1} trailing"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
    ];
    for (body, status, needle) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (got, answer) = app.post_raw(CREATE, body, t).await;
        assert_eq!(got, status, "{shown} -> {answer}");
        assert_eq!(answer["code"], 40000, "{answer}");
        assert!(answer["msg"].as_str().unwrap().contains(needle), "{shown} -> {answer}");
    }
    // Over the body limit (64 KiB), with and without a content-length the limit layer can see.
    let big = format!(r#"{{"remark":"{}"}}"#, "x".repeat(70 * 1024)).into_bytes();
    let (status, answer) = app.post_raw(CREATE, big.clone(), t).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["code"], 41300);
    assert!(answer["msg"].as_str().unwrap().contains("65536"), "{answer}");
    // Chunked, so no content-length warns the limit layer: the body is cut off while being read.
    let (status, answer) = chunked_post(&app.base, CREATE, &token, &big).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["code"], 41300, "{answer}");

    // Unknown routes and wrong methods answer JSON too.
    let (status, answer) = app.post("/order/v1/nope", &json!({}), t).await;
    assert_eq!((status, answer["code"].as_i64()), (StatusCode::NOT_FOUND, Some(40400)));
    let resp = app.http.get(format!("{}{CREATE}", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["code"], 40500, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_health_metrics_openapi_and_graceful_shutdown() {
    let mut app = spawn_app().await;
    let base = app.base.clone();
    let url = |p: &str| format!("{base}{p}");
    let resp = app.http.get(url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let generated = resp.headers().get("x-request-id").expect("a request id is generated").to_str().unwrap().to_owned();
    assert!(!generated.is_empty());
    let resp = app.http.get(url("/readyz")).header("x-request-id", "req-123").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "req-123", "echoed");
    let own = resp.headers().get("traceparent").expect("every answer names its trace").to_str().unwrap().to_owned();
    assert!(own.starts_with("00-") && own.len() == 55, "{own}");
    let ready: Value = resp.json().await.unwrap();
    assert_eq!(ready, json!({ "postgres": "ok", "nats": "ok" }));
    // A caller's trace is continued: same trace id, a new span of ours.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = app.http.get(url("/healthz")).header("traceparent", caller).send().await.unwrap();
    let answered = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(answered.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{answered}");
    assert_ne!(answered, caller);
    let resp = app.http.get(url("/healthz")).header("traceparent", "garbage").send().await.unwrap();
    assert!(resp.headers().contains_key("traceparent"), "a malformed traceparent starts a new trace");

    app.post("/no/such/path/HSO123", &json!({}), None).await;
    app.post("/usercenter/v1/user/detail", &json!({}), None).await;
    let metrics = app.http.get(url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(
            r#"paystream_http_requests_total{method="POST",route="/usercenter/v1/user/detail",status_class="4xx"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"route="unmatched""#));
    assert!(!metrics.contains("HSO123"), "raw paths never become labels");
    assert!(metrics.contains("paystream_http_request_duration_seconds_bucket"));

    let doc: Value = app.http.get(url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/usercenter/v1/user/wxMiniAuth",
        "/order/v1/homestayOrder/createHomestayOrder",
        "/order/v1/homestayOrder/refundHomestayOrder",
        "/payment/v1/thirdPayment/thirdPaymentWxPay",
        "/payment/v1/thirdPayment/thirdPaymentWxPayStatus",
        ingress::CALLBACK_PATH,
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }

    app.stop().await.expect("the server stops cleanly");
    assert!(app.http.get(url("/healthz")).send().await.is_err(), "no longer listening");
}

/// POSTs `body` with `Transfer-Encoding: chunked` over a raw connection; returns the status and the JSON body.
async fn chunked_post(base: &str, path: &str, token: &str, body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(8 * 1024) {
        // The server may answer and close before the whole body is sent.
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err()
            || s.write_all(chunk).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 =
        text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {text}"));
    let (headers, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let json_text = if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        // One chunk: "<len>\r\n<json>\r\n0\r\n\r\n".
        rest.split("\r\n").nth(1).unwrap_or_default().to_owned()
    } else {
        rest.to_owned()
    };
    (status, serde_json::from_str(&json_text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_only_configured_origins_and_slow_requests_time_out_with_json() {
    let app = spawn_app_with(Options {
        cors: vec!["https://shop.example.com".into()],
        request_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, format!("{}{CREATE}", app.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    let ok = preflight("https://shop.example.com").await.unwrap();
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://shop.example.com");
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    // WeChat answers slower than the request timeout: 503 with the envelope's error body.
    let alice = app.wx_login("alice").await;
    let h = app.homestay(true, 2, 100, 0).await;
    let sn = app.order(&alice, h, 1, 1, false).await;
    app.control.fault(&sandbox::Fault::Latency { api: sandbox::Api::Jsapi, ms: 2_000, times: Some(1) }).await.unwrap();
    let (status, body) = app.prepay(&alice, &sn).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], 50301, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_public_port_shows_no_readiness_or_metrics_and_ignores_a_callers_trace() {
    let app =
        spawn_app_with(Options { public_ops_routes: false, trust_traceparent: false, ..Default::default() }).await;
    for path in ["/readyz", "/metrics"] {
        let resp = app.http.get(format!("{}{path}", app.base)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path} is on the admin port only");
    }
    let resp = app.http.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // A stranger's traceparent (sampled flag set) neither names our trace nor decides our sampling.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = app.http.get(format!("{}/healthz", app.base)).header("traceparent", caller).send().await.unwrap();
    let answered = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(!answered.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{answered}");
}

/// Every route answers its own method (405 for another), and its request counter exists for every status class
/// before its first request, so `increase()` after a restart counts that first request and a 5xx ratio reads 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_its_method_and_its_counters_exist_from_the_start() {
    let app = spawn_app().await;
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    for (method, route) in ingress::api_routes() {
        for class in ["2xx", "4xx", "5xx"] {
            let series =
                format!(r#"paystream_http_requests_total{{method="{method}",route="{route}",status_class="{class}"}}"#);
            assert!(metrics.contains(&series), "{series} missing before any request");
        }
        let other = if *method == reqwest::Method::GET { reqwest::Method::POST } else { reqwest::Method::GET };
        let resp = app.http.request(other.clone(), format!("{}{route}", app.base)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{other} {route}");
        let resp = app.http.request(method.clone(), format!("{}{route}", app.base)).send().await.unwrap();
        assert!(
            ![StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED].contains(&resp.status()),
            "{method} {route}: {}",
            resp.status()
        );
    }
    assert!(metrics.contains(r#"paystream_http_requests_total{method="POST",route="unmatched",status_class="4xx"}"#));
}

/// The OpenAPI document describes every route the router serves, with the method it answers; a body whose fields
/// are all optional is not required (the server answers without one), and the status endpoint says it needs
/// `orderSn` or `sn`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_every_route_as_served() {
    let app = spawn_app().await;
    let doc: Value = app.http.get(format!("{}/openapi.json", app.base)).send().await.unwrap().json().await.unwrap();
    for (method, route) in ingress::api_routes() {
        let op = &doc["paths"][route][method.as_str().to_lowercase()];
        assert!(op.is_object(), "{method} {route} is served but not documented");
    }
    let body_required = |route: &str| doc["paths"][route]["post"]["requestBody"]["required"].as_bool();
    for route in ["/usercenter/v1/user/detail", "/order/v1/homestayOrder/userHomestayOrderList"] {
        assert_eq!(body_required(route), Some(false), "{route}");
        let (status, body) = app.post_raw(route, Vec::new(), None).await;
        assert_ne!(status, StatusCode::BAD_REQUEST, "{route} without a body: {body}");
    }
    assert_eq!(body_required("/usercenter/v1/user/login"), Some(true));
    let status_body = &doc["paths"]["/payment/v1/thirdPayment/thirdPaymentWxPayStatus"]["post"]["requestBody"];
    assert_eq!(status_body["required"], true);
    assert_eq!(
        status_body["content"]["application/json"]["schema"]["anyOf"],
        json!([{ "required": ["orderSn"] }, { "required": ["sn"] }])
    );
    let login = &doc["paths"]["/usercenter/v1/user/login"]["post"]["responses"];
    assert!(login["429"].is_object() && login["503"].is_object(), "{login}");
}
