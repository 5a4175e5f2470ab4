//! `spawn_app()`: the ingress on port 0 with a database of its own, a private NATS prefix (or a private
//! nats-server) and the sandbox as WeChat, whose callbacks are delivered to this ingress.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use bus::events::WechatTransactionReported;
use bus::{Envelope, Publisher, Topology};
use figment::Figment;
use figment::providers::{Format as _, Toml};
use futures::StreamExt as _;
use ingress::{CALLBACK_PATH, Deps, IngressConfig};
use reqwest::StatusCode;
use sandbox::{Control, InitOptions, RunningSandbox, SandboxOptions};
use serde_json::{Value, json};
use storage::{DbConfig, PgPool};
use testkit::TestDb;
use tokio_util::sync::CancellationToken;
use wechat::WechatConfig;

pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
pub const WAIT: Duration = Duration::from_secs(15);

pub struct Options {
    pub nats_url: Option<String>,
    pub status_grace: Duration,
    pub body_limit: usize,
    pub request_timeout: Duration,
    pub cors: Vec<String>,
    /// `http.public_ops_routes` and `http.trust_traceparent` (on here: most tests read them through the API port).
    pub public_ops_routes: bool,
    pub trust_traceparent: bool,
    /// Off here (one test drives many users from one address); `limits.rs` turns them on.
    pub rate_limits: ingress::RateLimits,
    pub client_ip_header: Option<String>,
    pub max_unpaid_orders: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nats_url: None,
            status_grace: Duration::from_secs(10),
            body_limit: 64 * 1024,
            request_timeout: Duration::from_secs(10),
            cors: Vec::new(),
            public_ops_routes: true,
            trust_traceparent: true,
            rate_limits: ingress::RateLimits { enabled: false, ..Default::default() },
            client_ip_header: None,
            max_unpaid_orders: 0,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub sandbox: RunningSandbox,
    pub control: Control,
    pub wechat: WechatConfig,
    pub topology: Topology,
    pub js: jetstream::Context,
    pub shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _db: TestDb,
    dir: PathBuf,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.sandbox.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(opts: Options) -> TestApp {
    observability::init_for_tests();
    let db = TestDb::create().await;
    storage::migrate(&storage::DbConfig::new(&db.url)).await.expect("migrations run");
    let pool = storage::pool(&DbConfig::new(&db.url)).expect("pool");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = std::env::temp_dir().join(testkit::unique("ingress-sandbox-"));
    let notify_url = format!("http://{addr}{CALLBACK_PATH}");
    sandbox::init(&dir, &InitOptions { notify_url: Some(notify_url), ..Default::default() }).expect("sandbox identity");
    let sandbox = sandbox::spawn_for_tests_with(&dir, SandboxOptions { time_scale: 1000.0, ..Default::default() })
        .await
        .expect("sandbox starts");
    let wechat: WechatConfig =
        Figment::from(Toml::file(sandbox.identity.config_path())).extract_inner("wechat").expect("[wechat]");
    let pay = wechat::PayClient::from_config(&wechat).unwrap();
    let mini = wechat::MiniProgramClient::from_config(&wechat).unwrap();

    let nats = bus::NatsConfig {
        url: opts.nats_url.unwrap_or_else(testkit::nats_url),
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (_client, js) = bus::connect(&nats).await.expect("NATS");
    let topology = Topology::new(&testkit::unique("ing")).unwrap();
    topology.ensure_streams(&js).await.expect("streams");
    let publisher = Publisher::new(js.clone(), Arc::new(topology.clone()));

    let mut config = IngressConfig::new(SECRET);
    config.status_grace = opts.status_grace;
    config.status_query_interval = Duration::from_millis(100);
    config.body_limit_bytes = opts.body_limit;
    config.request_timeout = opts.request_timeout;
    config.cors_allowed_origins = opts.cors;
    config.public_ops_routes = opts.public_ops_routes;
    config.trust_traceparent = opts.trust_traceparent;
    config.rate_limits = opts.rate_limits;
    config.client_ip_header = opts.client_ip_header;
    config.max_unpaid_orders = opts.max_unpaid_orders;
    config.validate().unwrap();
    let deps = Deps { pool: pool.clone(), publisher, pay, mini, wechat: wechat.clone(), config };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(ingress::serve(deps, listener, shutdown.clone()));
    let control = sandbox.control();
    TestApp {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        pool,
        sandbox,
        control,
        wechat,
        topology,
        js,
        shutdown,
        server: Some(server),
        _db: db,
        dir,
    }
}

impl TestApp {
    /// Fires the shutdown token and waits for the server to finish its in-flight requests.
    pub async fn stop(&mut self) -> std::io::Result<()> {
        self.shutdown.cancel();
        match self.server.take() {
            Some(h) => h.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// POSTs JSON; returns the status and the parsed body (Null when empty).
    pub async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> (StatusCode, Value) {
        self.post_raw(path, serde_json::to_vec(body).unwrap(), token).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>, token: Option<&str>) -> (StatusCode, Value) {
        let mut req =
            self.http.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request sent");
        read(resp).await
    }

    /// The data of a successful call; panics with the body otherwise.
    pub async fn ok(&self, path: &str, body: &Value, token: Option<&str>) -> Value {
        let (status, v) = self.post(path, body, token).await;
        assert_eq!(status, StatusCode::OK, "{path}: {v}");
        assert_eq!(v["code"], 200, "{v}");
        v["data"].clone()
    }

    /// Logs in through the mini-program: `who` picks the openid; each call uses a fresh code.
    pub async fn wx_login(&self, who: &str) -> String {
        let code = format!("{who}:{}", testkit::unique(""));
        let data = self.ok("/usercenter/v1/user/wxMiniAuth", &json!({ "code": code }), None).await;
        data["accessToken"].as_str().expect("accessToken").to_owned()
    }

    pub async fn conn(&self) -> storage::db::PooledConn {
        self.pool.get().await.unwrap()
    }

    /// A homestay of the test's own: (listed, capacity, price per night, food price per person and night).
    pub async fn homestay(&self, listed: bool, people: i32, price: i64, food: i64) -> i64 {
        let new = storage::homestays::NewHomestay {
            title: "Test homestay".into(),
            sub_title: "sub".into(),
            info: "info".into(),
            people_num: people,
            row_state: i16::from(listed),
            row_type: 0,
            food_info: "breakfast".into(),
            food_price: food,
            homestay_price: price,
            market_homestay_price: price,
        };
        storage::homestays::insert(&mut *self.conn().await, &new).await.unwrap().id
    }

    /// Books `nights` nights from tomorrow for `people`; returns the order sn.
    pub async fn order(&self, token: &str, homestay: i64, nights: i64, people: i64, food: bool) -> String {
        let start = tomorrow();
        let body = json!({
            "homestayId": homestay, "isFood": food, "liveStartTime": start, "liveEndTime": start + nights * 86400,
            "livePeopleNum": people, "remark": "late arrival"
        });
        let data = self.ok("/order/v1/homestayOrder/createHomestayOrder", &body, Some(token)).await;
        data["orderSn"].as_str().unwrap().to_owned()
    }

    pub async fn prepay(&self, token: &str, order_sn: &str) -> (StatusCode, Value) {
        self.post(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            &json!({ "orderSn": order_sn, "serviceType": "homestayOrder" }),
            Some(token),
        )
        .await
    }

    /// Every `wechat.transaction` event so far, read with an ephemeral consumer from the start of the stream.
    pub async fn events(&self) -> Vec<Envelope<WechatTransactionReported>> {
        self.events_on::<WechatTransactionReported>().await
    }

    /// Every event stored on `E`'s subject.
    pub async fn events_on<E: bus::Event>(&self) -> Vec<Envelope<E>> {
        let stream = self.js.get_stream(self.topology.stream_of(E::SUBJECT)).await.unwrap();
        let pending = stream.get_info().await.unwrap().state.messages;
        if pending == 0 {
            return Vec::new();
        }
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: self.topology.subject(E::SUBJECT),
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(5),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch =
            consumer.fetch().max_messages(1000).expires(Duration::from_millis(300)).messages().await.unwrap();
        let mut out = Vec::new();
        while let Some(Ok(msg)) = batch.next().await {
            out.push(Envelope::<E>::decode(&msg.payload).expect("an event of the subject's type"));
        }
        out
    }
}

async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON ({status}): {}", String::from_utf8_lossy(&bytes)))
    };
    (status, v)
}

/// Midnight (UTC+8) of tomorrow, in unix seconds: a valid check-in day.
pub fn tomorrow() -> i64 {
    let beijing = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
    let day = chrono::Utc::now().with_timezone(&beijing).date_naive() + chrono::Days::new(1);
    day.and_hms_opt(0, 0, 0).unwrap().and_local_timezone(beijing).unwrap().timestamp()
}
