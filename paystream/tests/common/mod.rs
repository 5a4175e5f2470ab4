//! A whole system for end-to-end tests, run as an operator runs it: the WeChat sandbox and `paystream all` as real
//! processes, with a fresh database and subject prefix, talked to over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Formal: the sandbox is WeChat here, and formal needs no allow-list of test users.
const NOTIFIER: &str = r#"
[notifier]
miniprogram_state = "formal"

[notifier.templates.pay_success]
template_id = "TPL_PAY_SUCCESS"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string6 = "order_sn", thing1 = "title", amount2 = "amount", time4 = "live_start", time5 = "live_end" }

[notifier.templates.checkin_notice]
template_id = "TPL_CHECKIN"
page = "pages/order/detail?sn={order_sn}"
fields = { thing1 = "title", date2 = "live_period", character_string3 = "trade_code", number4 = "live_people_num" }

[notifier.templates.refund_success]
template_id = "TPL_REFUND"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string1 = "order_sn", thing2 = "title", amount3 = "amount" }
"#;

const JWT: &str = "system-test-secret-that-is-long-enough-0123456789";

pub struct System {
    pub db: testkit::TestDb,
    pub dir: PathBuf,
    pub prefix: String,
    pub api: String,
    pub sandbox: String,
    /// `/healthz`, `/readyz` and `/metrics` of `paystream all`.
    pub admin: String,
    pub children: Vec<Child>,
    pub http: reqwest::Client,
    /// The extra environment `paystream all` was started with (for [`System::restart_all`]).
    all_env: Vec<(String, String)>,
}

pub fn paystream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paystream"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYSTREAM") {
            c.env_remove(k);
        }
    }
    c.stderr(Stdio::null());
    c
}

/// Runs `paystream bench ARGS…` against the test infrastructure to completion; (stdout, last line).
pub fn bench(args: &[&str]) -> (String, String) {
    let out = paystream()
        .arg("bench")
        .args(args)
        .env("PAYSTREAM__DATABASE__URL", testkit::setting("DATABASE_URL"))
        .env("PAYSTREAM__NATS__URL", testkit::nats_url())
        .env("PAYSTREAM__TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    (stdout, last)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl System {
    pub async fn start() -> System {
        Self::start_with(&[]).await
    }

    /// As [`System::start`], with extra environment for `paystream all` (whose JSON log goes to [`System::log`]).
    pub async fn start_with(env: &[(&str, String)]) -> System {
        let db = testkit::TestDb::create().await;
        let dir = std::env::temp_dir().join(testkit::unique("paystream-sys-"));
        let (http_port, admin_port) = (free_port(), free_port());
        let api = format!("http://127.0.0.1:{http_port}");
        let status = paystream()
            .args(["sandbox", "init", "--dir"])
            .arg(&dir)
            .args(["--notify-url", &format!("{api}/payment/v1/thirdPayment/thirdPaymentWxPayCallback")])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let mut sandbox = paystream()
            .args(["sandbox", "--listen", "127.0.0.1:0", "--time-scale", "1000", "--dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(sandbox.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let sandbox_url = first.trim().rsplit(' ').next().unwrap().to_owned();
        let sandbox_toml = std::fs::read_to_string(dir.join("paystream.toml")).unwrap();
        std::fs::write(dir.join("all.toml"), format!("{sandbox_toml}\n{NOTIFIER}")).unwrap();
        let mut sys = System {
            db,
            dir,
            prefix: testkit::unique("sys"),
            api,
            sandbox: sandbox_url,
            admin: format!("http://127.0.0.1:{admin_port}"),
            children: vec![sandbox],
            http: reqwest::Client::new(),
            all_env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        };
        let all = sys.spawn_all(false);
        sys.children.push(all);
        sys.until_ready().await;
        sys
    }

    /// `paystream all` on this system's ports, logging to all.log (appended to after a restart).
    fn spawn_all(&self, append_log: bool) -> Child {
        let port = |url: &str| url.rsplit(':').next().unwrap().to_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(append_log)
            .write(true)
            .truncate(!append_log)
            .open(self.dir.join("all.log"))
            .unwrap();
        let mut all = self.paystream();
        all.arg("all")
            .env("PAYSTREAM__HTTP__LISTEN", format!("127.0.0.1:{}", port(&self.api)))
            .env("PAYSTREAM__ADMIN__LISTEN", format!("127.0.0.1:{}", port(&self.admin)))
            .env("PAYSTREAM__TELEMETRY__LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.all_env {
            all.env(k, v);
        }
        all.spawn().unwrap()
    }

    async fn until_ready(&self) {
        let ready = format!("{}/readyz", self.admin);
        testkit::eventually(Duration::from_secs(30), "paystream all ready", || {
            let (http, ready) = (self.http.clone(), ready.clone());
            async move { http.get(&ready).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
    }

    /// Stops `paystream all` (SIGTERM, as a deployment does) and starts it again on the same ports.
    pub async fn restart_all(&mut self) {
        let mut old = self.children.remove(1);
        let _ = Command::new("kill").args(["-TERM", &old.id().to_string()]).status();
        let _ = old.wait();
        let new = self.spawn_all(true);
        self.children.insert(1, new);
        self.until_ready().await;
    }

    /// `paystream --config all.toml` with this system's database, NATS and prefix.
    pub fn paystream(&self) -> Command {
        let mut c = paystream();
        c.arg("--config")
            .arg(self.dir.join("all.toml"))
            .env("PAYSTREAM__DATABASE__URL", &self.db.url)
            .env("PAYSTREAM__NATS__URL", testkit::nats_url())
            .env("PAYSTREAM__NATS__PREFIX", &self.prefix)
            .env("PAYSTREAM__HTTP__JWT_SECRET", JWT)
            .env("PAYSTREAM__HTTP__SEED_DEMO_HOMESTAYS", "true")
            // These tests drive many users from one address (the cluster test: a thousand payments); the limits
            // have tests of their own (ingress/tests/api/limits.rs).
            .env("PAYSTREAM__HTTP__RATE_LIMITS__ENABLED", "false")
            .env("PAYSTREAM__HTTP__MAX_UNPAID_ORDERS", "0")
            .env("PAYSTREAM__CONSUMER__BACKOFF", "[\"50ms\", \"100ms\"]")
            .env("PAYSTREAM__CONSUMER__MAX_DELIVER", "3")
            .env("PAYSTREAM__TIMEOUT__INTERVAL", "100ms")
            .env("PAYSTREAM__TELEMETRY__LOG_FILTER", "warn");
        c
    }

    pub async fn ok(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut req = self.http.post(format!("{}{path}", self.api)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "{path}: {body}");
        body["data"].clone()
    }

    pub async fn sandbox(&self, path: &str, body: Value) {
        let r = self.http.post(format!("{}{path}", self.sandbox)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "sandbox {path}: {}", r.text().await.unwrap());
    }

    pub async fn login(&self, who: &str) -> String {
        let code = format!("{who}-{}:1", testkit::unique(""));
        let data = self.ok("/usercenter/v1/user/wxMiniAuth", None, json!({ "code": code })).await;
        data["accessToken"].as_str().unwrap().to_owned()
    }

    /// Books two nights from a week ahead and asks for the pay parameters; returns (order sn, payment sn).
    pub async fn book_and_prepay(&self, token: &str) -> (String, String) {
        let start = chrono::Utc::now().timestamp() / 86_400 * 86_400 + 7 * 86_400;
        let order = self
            .ok(
                "/order/v1/homestayOrder/createHomestayOrder",
                Some(token),
                json!({ "homestayId": 1, "isFood": false, "liveStartTime": start, "liveEndTime": start + 2 * 86_400,
                        "livePeopleNum": 2, "remark": "" }),
            )
            .await;
        let sn = order["orderSn"].as_str().unwrap().to_owned();
        self.ok(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(token),
            json!({ "orderSn": sn, "serviceType": "homestayOrder" }),
        )
        .await;
        let status =
            self.ok("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(token), json!({ "orderSn": sn })).await;
        (sn, status["paySn"].as_str().unwrap().to_owned())
    }

    /// The user pays `payment` in WeChat (the sandbox), which then calls paystream back.
    pub async fn pay_at_wechat(&self, payment: &str) {
        self.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    }

    pub async fn order_status(&self, token: &str, order: &str) -> (Value, Value) {
        let s =
            self.ok("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(token), json!({ "orderSn": order })).await;
        (s["payStatus"].clone(), s["tradeState"].clone())
    }

    /// Every subscribe message WeChat (the sandbox) received; none while it cannot be asked.
    pub async fn subscribe_messages(&self) -> Vec<Value> {
        let all: Value = match self.http.get(format!("{}/sandbox/v1/subscribe-messages", self.sandbox)).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        all["data"].as_array().cloned().unwrap_or_default()
    }

    /// The subscribe messages that name `order`.
    pub async fn subscribe_messages_for(&self, order: &str) -> Vec<Value> {
        self.subscribe_messages().await.into_iter().filter(|m| m.to_string().contains(order)).collect()
    }

    /// What `paystream all` logged so far (JSON lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("all.log")).unwrap_or_default()
    }

    /// The text of `paystream all`'s `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }

    pub async fn sql(&self, statement: String) {
        let mut conn = storage::connect(&storage::DbConfig::new(&self.db.url)).await.unwrap();
        storage::RunQueryDsl::execute(diesel::sql_query(statement), &mut conn).await.unwrap();
    }
}

impl Drop for System {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl System {
    pub async fn call(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.api)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn until_paid(&self, token: &str, order: &str) {
        testkit::eventually(Duration::from_secs(20), "order paid", || async {
            let (pay, trade) = self.order_status(token, order).await;
            (pay == 1 && trade == 1).then_some(())
        })
        .await;
    }

    /// Messages stored on `<prefix>.<logical>` in the stream of `family` (`PAYMENT`, `NOTIFY`, `DLQ`, …).
    pub async fn count(&self, family: &str, logical: &str) -> u64 {
        use futures::StreamExt;
        let js = async_nats::jetstream::new(testkit::nats().await);
        let stream = js.get_stream(format!("{}_{family}", self.prefix.to_uppercase())).await.unwrap();
        let counts: Vec<_> =
            stream.info_with_subjects(format!("{}.{logical}", self.prefix)).await.unwrap().collect().await;
        counts.into_iter().map(|r| r.unwrap().1 as u64).sum()
    }
}
