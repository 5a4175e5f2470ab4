//! Shared set-up for notifier tests: a fresh database, a private stream prefix, the WeChat sandbox on port 0, users
//! whose openids the sandbox issued, and the notifier running against all of them.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use bus::events::{NotificationRequest, NotifyParams, NotifyTemplate};
use bus::{ConsumerConfig, Publisher, Topology};
use chrono::{DateTime, TimeZone as _, Utc};
use figment::Figment;
use figment::providers::{Format as _, Toml};
use notifier::NotifierConfig;
use notifier::ledger::NotificationRow;
use sandbox::{RunningSandbox, SubscribeRecord};
use storage::users::{self, NewUser};
use storage::{AuthType, Fen, OrderSn, PgPool, UserId};
use testkit::TestDb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wechat::{MiniProgramClient, SmsClient, SmsConfig, WechatConfig};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// The `[notifier]` section the tests start from; `{state}` and `{allow}` are filled in per test.
pub const NOTIFIER_TOML: &str = r#"
[notifier]
miniprogram_state = "{state}"
{allow}
time_zone = "+08:00"

[notifier.templates.pay_success]
template_id = "TPL_PAY_SUCCESS"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string6 = "order_sn", thing1 = "title", amount2 = "amount", time4 = "live_start", time5 = "live_end" }
sms_template_id = "100001"
sms_params = ["order_sn", "amount", "live_start"]

[notifier.templates.checkin_notice]
template_id = "TPL_CHECKIN"
page = "pages/order/detail?sn={order_sn}"
fields = { thing1 = "title", date2 = "live_period", character_string3 = "trade_code", number4 = "live_people_num" }
"#;

/// A `[notifier]` section in `state` (`allow` is the TOML line for `allow_openids`, or empty).
pub fn notifier_config(state: &str, allow: &str) -> NotifierConfig {
    let toml = NOTIFIER_TOML.replace("{state}", state).replace("{allow}", allow);
    Figment::from(Toml::string(&toml)).extract_inner("notifier").expect("test [notifier] parses")
}

/// Fast delivery settings: short retries, and a short handler timeout (it is also the claim lease).
pub fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        ack_wait: Duration::from_secs(8),
        max_deliver: 40,
        backoff: vec![Duration::from_millis(100), Duration::from_millis(200)],
        concurrency: 8,
        handler_timeout: Duration::from_secs(3),
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Env {
    pub db: TestDb,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub publisher: Publisher,
    pub sandbox: RunningSandbox,
    pub wechat: WechatConfig,
    pub sms: SmsConfig,
    pub mini: MiniProgramClient,
    running: Option<(CancellationToken, JoinHandle<Result<(), notifier::NotifierError>>)>,
    _dir: TempDir,
}

impl Env {
    pub async fn new() -> Env {
        observability::init_for_tests();
        let db = TestDb::create().await;
        storage::migrate(&storage::DbConfig::new(&db.url)).await.unwrap();
        let pool = storage::pool(&storage::DbConfig::new(&db.url)).unwrap();
        let client = testkit::nats().await;
        let js = jetstream::new(client);
        let topology = Topology::new(&testkit::unique("n")).unwrap();
        topology.ensure_streams(&js).await.unwrap();
        let publisher = Publisher::new(js.clone(), Arc::new(topology));

        let dir = TempDir(std::env::temp_dir().join(testkit::unique("paystream-notifier-")));
        let sandbox = sandbox::spawn_for_tests(&dir.0).await.expect("sandbox starts");
        let fig = Figment::from(Toml::file(sandbox.identity.config_path()));
        let wechat: WechatConfig = fig.extract_inner("wechat").expect("sandbox [wechat]");
        let sms: SmsConfig = fig.extract_inner("sms").expect("sandbox [sms]");
        let mini = MiniProgramClient::from_config(&wechat).unwrap();
        Env { db, pool, js, publisher, sandbox, wechat, sms, mini, running: None, _dir: dir }
    }

    /// Starts the notifier with `config` (SMS through the sandbox).
    pub fn start(&mut self, config: NotifierConfig) {
        self.start_with(config, consumer_config());
    }

    pub fn start_with(&mut self, config: NotifierConfig, consumer: ConsumerConfig) {
        assert!(self.running.is_none(), "notifier already running");
        let deps = notifier::NotifierDeps {
            config,
            consumer,
            pool: self.pool.clone(),
            publisher: self.publisher.clone(),
            miniprogram: self.mini.clone(),
            sms: Some(SmsClient::from_config(&self.sms).unwrap()),
        };
        let token = CancellationToken::new();
        let task = tokio::spawn(notifier::run(deps, token.clone()));
        self.running = Some((token, task));
    }

    /// Starts one more notifier process-alike on the same consumers (another replica), stopped with `token`.
    pub fn spawn_replica(
        &self,
        config: NotifierConfig,
        token: CancellationToken,
    ) -> JoinHandle<Result<(), notifier::NotifierError>> {
        let deps = notifier::NotifierDeps {
            config,
            consumer: consumer_config(),
            pool: self.pool.clone(),
            publisher: self.publisher.clone(),
            // A client of its own, as another process would have.
            miniprogram: MiniProgramClient::from_config(&self.wechat).unwrap(),
            sms: Some(SmsClient::from_config(&self.sms).unwrap()),
        };
        tokio::spawn(notifier::run(deps, token))
    }

    /// Stops the notifier gracefully and returns how its run ended.
    pub async fn stop(&mut self) -> Result<(), notifier::NotifierError> {
        let (token, task) = self.running.take().expect("notifier running");
        token.cancel();
        task.await.unwrap()
    }

    /// A user who logged in through the mini-program with `code` (the sandbox's openid for it), and a mobile
    /// number if given. Returns the user and the openid.
    pub async fn user(&self, code: &str, mobile: Option<&str>) -> (UserId, String) {
        let session = self.mini.jscode2session(code).await.expect("jscode2session");
        let openid = session.openid.expose().to_owned();
        let mut conn = self.pool.get().await.unwrap();
        let new = NewUser { mobile: mobile.map(str::to_owned), nickname: code.into(), ..Default::default() };
        let user = users::insert_with_auth(&mut conn, &new, AuthType::WxMini, &openid).await.unwrap();
        (user.id(), openid)
    }

    pub async fn row(&self, key: &str) -> Option<NotificationRow> {
        let mut conn = self.pool.get().await.unwrap();
        notifier::ledger::find(&mut conn, key).await.unwrap()
    }

    /// Waits until `key`'s row has `status`.
    pub async fn wait_status(&self, key: &str, status: &str) -> NotificationRow {
        testkit::eventually(DEADLINE, &format!("{key} to become {status}"), || async {
            self.row(key).await.filter(|r| r.status == status)
        })
        .await
    }

    pub async fn messages_to(&self, openid: &str) -> Vec<SubscribeRecord> {
        let all = self.sandbox.control().subscribe_messages().await.unwrap();
        all.into_iter().filter(|m| m.touser == openid).collect()
    }

    /// Waits until the consumer has nothing pending and nothing waiting for an ack: every delivery was answered.
    pub async fn settled(&self, consumer: &str) {
        let stream_name = self.publisher.topology().stream_of(bus::Subject::NotifyMiniprogram);
        let stream = self.js.get_stream(&stream_name).await.unwrap();
        testkit::eventually(DEADLINE, &format!("{consumer} to settle"), || {
            let stream = stream.clone();
            async move {
                let mut c: PullConsumer = stream.get_consumer(consumer).await.ok()?;
                let info = c.info().await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0).then_some(())
            }
        })
        .await;
    }

    /// Messages in the dead-letter stream of `consumer`.
    pub async fn dead_letters(&self, consumer: &str) -> u64 {
        let topology = self.publisher.topology();
        let stream = self.js.get_stream(topology.dlq_stream()).await.unwrap();
        let mut counter: PullConsumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                filter_subject: topology.dlq_subject(consumer),
                ..Default::default()
            })
            .await
            .unwrap();
        counter.info().await.unwrap().num_pending
    }
}

/// The facts of one paid order.
pub fn params(order_sn: &OrderSn) -> NotifyParams {
    NotifyParams {
        order_sn: order_sn.clone(),
        title: "西湖边的安静小院（含早餐，可停车，近地铁站）".into(),
        amount: Fen::new(12345).unwrap(),
        live_start: live_start(),
        live_end: Utc.with_ymd_and_hms(2026, 12, 3, 4, 0, 0).unwrap(),
        trade_code: "K7Q2M9".into(),
        live_people_num: 2,
    }
}

/// Check-in of the test order: 06:00 UTC, 14:00 in Beijing.
pub fn live_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 6, 0, 0).unwrap()
}

pub fn request(template: NotifyTemplate, user_id: UserId, order_sn: &OrderSn) -> NotificationRequest {
    NotificationRequest { template, user_id, params: params(order_sn) }
}

pub fn order_sn() -> OrderSn {
    OrderSn::generate(Utc::now())
}
