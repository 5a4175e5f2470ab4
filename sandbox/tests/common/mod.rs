//! Test helpers: a sandbox on port 0 in a private directory, a merchant that signs requests
//! with the `wechat` crypto primitives (not its typed client), a capturing callback receiver,
//! and waiting on a condition with a deadline.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use sandbox::{RunningSandbox, SandboxOptions};
use serde_json::Value;
use wechat::{AuthorizationHeader, RsaSigner, RsaVerifierKey, nonce_str, response_message};

/// A fresh directory under the system temp dir (removed by [`TestDir`]'s Drop).
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("paystream-sandbox-test-{}", uuid::Uuid::new_v4()));
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Env {
    pub dir: TestDir,
    pub sandbox: RunningSandbox,
    pub merchant: Merchant,
}

/// A sandbox with every WeChat delay divided by 1000 (15 s retry → 15 ms).
pub async fn spawn() -> Env {
    spawn_with(SandboxOptions { time_scale: 1000.0, ..Default::default() }).await
}

pub async fn spawn_with(options: SandboxOptions) -> Env {
    let dir = TestDir::new();
    let sandbox = sandbox::spawn_for_tests_with(&dir.0, options).await.expect("sandbox starts");
    let merchant = Merchant::new(&sandbox);
    Env { dir, sandbox, merchant }
}

/// What a merchant holds: its key and serial, WeChat's public key, the base URL.
pub struct Merchant {
    pub mchid: String,
    pub appid: String,
    pub serial_no: String,
    pub signer: RsaSigner,
    pub platform_key: RsaVerifierKey,
    pub platform_key_id: String,
    pub apiv3_key: [u8; 32],
    pub base: String,
    pub http: reqwest::Client,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

impl Merchant {
    pub fn new(sb: &RunningSandbox) -> Self {
        let id = &sb.identity;
        Self {
            mchid: id.mchid.clone(),
            appid: id.appid.clone(),
            serial_no: id.merchant_serial_no.clone(),
            signer: id.merchant_signer().unwrap(),
            platform_key: id.platform_verifier_key().unwrap(),
            platform_key_id: id.platform_public_key_id.clone(),
            apiv3_key: id.apiv3_key_bytes(),
            base: sb.base_url(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// A correctly signed call; checks that the answer is signed by WeChat's key.
    pub async fn call(&self, method: &str, path_and_query: &str, body: Option<&Value>) -> Answer {
        let body = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
        let ts = chrono::Utc::now().timestamp();
        let auth = AuthorizationHeader::sign(
            &self.signer,
            &self.mchid,
            &self.serial_no,
            method,
            path_and_query,
            ts,
            &nonce_str(),
            &body,
        );
        self.send(method, path_and_query, body, Some(auth.to_string())).await
    }

    /// Sends exactly these bytes with this Authorization; verifies the answer's signature.
    pub async fn send(&self, method: &str, path_and_query: &str, body: Vec<u8>, auth: Option<String>) -> Answer {
        let url = format!("{}{}", self.base, path_and_query);
        let mut req = self
            .http
            .request(method.parse().unwrap(), url)
            .header("Accept", "application/json")
            .header("User-Agent", "sandbox-tests/1");
        if !body.is_empty() {
            req = req.header("Content-Type", "application/json").body(body);
        }
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.expect("sandbox answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap().to_vec();
        let answer = Answer { status, headers, body };
        self.assert_signed(&answer);
        answer
    }

    /// Every Pay answer carries a valid platform signature over TIMESTAMP\nNONCE\nBODY\n.
    pub fn assert_signed(&self, a: &Answer) {
        assert_eq!(a.header("Wechatpay-Serial"), self.platform_key_id, "public-key mode serial");
        assert_eq!(a.header("Wechatpay-Signature-Type"), "WECHATPAY2-SHA256-RSA2048");
        assert!(!a.header("Request-ID").is_empty());
        let ts: i64 = a.header("Wechatpay-Timestamp").parse().expect("timestamp header");
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 300);
        let msg = response_message(ts, a.header("Wechatpay-Nonce"), &a.body);
        self.platform_key.verify(&msg, a.header("Wechatpay-Signature")).expect("answer signed by the platform key");
    }

    pub fn prepay_body(&self, out_trade_no: &str, total: i64, notify_url: &str) -> Value {
        serde_json::json!({
            "appid": self.appid,
            "mchid": self.mchid,
            "description": "民宿订单 test",
            "out_trade_no": out_trade_no,
            "notify_url": notify_url,
            "amount": {"total": total, "currency": "CNY"},
            "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        })
    }

    pub async fn prepay(&self, out_trade_no: &str, total: i64, notify_url: &str) -> Answer {
        self.call("POST", "/v3/pay/transactions/jsapi", Some(&self.prepay_body(out_trade_no, total, notify_url))).await
    }

    pub async fn query(&self, out_trade_no: &str) -> Answer {
        self.call("GET", &format!("/v3/pay/transactions/out-trade-no/{out_trade_no}?mchid={}", self.mchid), None).await
    }

    /// Control API: the user pays.
    pub async fn pay(&self, out_trade_no: &str, result: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/sandbox/v1/transactions/{out_trade_no}/pay", self.base))
            .json(&serde_json::json!({"result": result}))
            .send()
            .await
            .unwrap()
    }

    pub async fn control_get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.base)).send().await.unwrap().json().await.unwrap()
    }

    pub async fn fault(&self, fault: Value) {
        let resp = self.http.post(format!("{}/sandbox/v1/faults", self.base)).json(&fault).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202, "{}", resp.text().await.unwrap_or_default());
    }
}

/// Polls `probe` every few milliseconds until it yields a value, failing the test after
/// `deadline`. (A poll interval, not a sleep standing in for synchronisation.)
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        loop {
            tick.tick().await;
            if let Some(v) = probe().await {
                return v;
            }
        }
    };
    tokio::time::timeout(deadline, poll).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

/// A merchant's callback endpoint that answers 500 to the first `fail_first` requests and
/// 204 after, recording everything.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let app = axum::Router::new()
            .route(
                "/notify",
                axum::routing::post(
                    |State((got, fail_first)): State<(Arc<Mutex<Vec<Received>>>, usize)>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        let mut g = got.lock().unwrap();
                        g.push(Received { headers, body, at: Instant::now() });
                        if g.len() <= fail_first {
                            (StatusCode::INTERNAL_SERVER_ERROR, r#"{"code":"FAIL","message":"失败"}"#)
                        } else {
                            (StatusCode::NO_CONTENT, "")
                        }
                    },
                ),
            )
            .with_state((got.clone(), fail_first));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/notify", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}
