//! The sandbox server: shared state, router, bind/run, and the test helper.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wechat::{RsaSigner, RsaVerifierKey};

use crate::cert::PlatformCertificate;
use crate::faults::Faults;
use crate::identity::{Identity, IdentityError, load_or_init};
use crate::mini::MiniState;
use crate::notify::CallbackRecord;
use crate::pay::PayState;
use crate::sms::SmsRecord;
use crate::{control, mini, pay, sms};

/// WeChat's callback retry schedule after a failed delivery (protocol file): 15 retries over
/// 24 h 4 min.
pub const WECHAT_RETRY_SCHEDULE_SECS: [u64; 15] =
    [15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800, 21600, 21600];

/// Which serial the sandbox signs its answers under by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigningMode {
    /// `Wechatpay-Serial: PUB_KEY_ID_…` (WeChat's default for merchants since late 2024).
    #[default]
    PublicKey,
    /// The platform certificate's serial (served by `/v3/certificates`).
    Certificate,
}

/// Knobs of a sandbox run.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Divides every WeChat delay (callback retries, refund processing): 1000 turns the 15 s
    /// first retry into 15 ms. Must be finite and > 0.
    pub time_scale: f64,
    /// A callback not answered within this is a failed attempt (WeChat: 5 s). Not scaled: it
    /// bounds a real HTTP exchange.
    pub callback_timeout: Duration,
    /// Delays before each retry, before scaling.
    pub retry_schedule: Vec<Duration>,
    /// How long a refund stays PROCESSING, before scaling.
    pub refund_delay: Duration,
    /// Known subscribe-message template ids; empty accepts any id (40037 then needs a
    /// registered list, see `PUT /sandbox/v1/templates`).
    pub templates: Vec<String>,
    /// Default serial for signing answers; a request's `Wechatpay-Serial` header overrides it.
    pub signing: SigningMode,
    /// WeChat rejects requests without `User-Agent`; so do we unless this is false.
    pub require_user_agent: bool,
    /// Rewrite `DIR/paystream.toml` with the bound address when binding.
    pub write_config: bool,
    /// Deliver callbacks to hosts other than loopback. Off by default: the sandbox is for this
    /// machine, and a test that pays an order with a made-up `https://example.com/…`
    /// notify_url must not send anything off the machine (the attempt is recorded as refused).
    pub allow_remote_callbacks: bool,
    /// How many records each journal (callback attempts, subscribe messages, SMS) keeps; the
    /// oldest go first, so a long load run does not grow without bound.
    pub max_records: usize,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            callback_timeout: Duration::from_secs(5),
            retry_schedule: WECHAT_RETRY_SCHEDULE_SECS.iter().map(|s| Duration::from_secs(*s)).collect(),
            refund_delay: Duration::from_secs(5),
            templates: Vec::new(),
            signing: SigningMode::PublicKey,
            require_user_agent: true,
            write_config: true,
            max_records: 100_000,
            allow_remote_callbacks: false,
        }
    }
}

impl SandboxOptions {
    /// `d` divided by the time scale.
    pub fn scaled(&self, d: Duration) -> Duration {
        d.div_f64(self.time_scale)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("time_scale must be finite and greater than 0, got {0}")]
    BadTimeScale(f64),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("http client: {0}")]
    Http(String),
}

/// Everything the handlers share. Each `Mutex` guards one kind of record and is held only
/// for short, await-free sections so thousands of requests per second do not queue on it.
pub(crate) struct Shared {
    pub identity: Identity,
    pub options: SandboxOptions,
    pub platform: RsaSigner,
    pub merchant_key: RsaVerifierKey,
    pub apiv3_key: [u8; 32],
    pub certificate: PlatformCertificate,
    pub pay: Mutex<PayState>,
    pub faults: Mutex<Faults>,
    pub callbacks: Mutex<Journal<CallbackRecord>>,
    pub mini: Mutex<MiniState>,
    pub sms: Mutex<Journal<SmsRecord>>,
    pub http: reqwest::Client,
    /// Cancels background work (callback retries, refund completion) on shutdown.
    pub background: CancellationToken,
}

/// A bounded list of records: pushing past `cap` drops the oldest.
#[derive(Debug)]
pub(crate) struct Journal<T> {
    items: std::collections::VecDeque<T>,
    cap: usize,
}

impl<T> Journal<T> {
    pub fn new(cap: usize) -> Self {
        Self { items: std::collections::VecDeque::new(), cap: cap.max(1) }
    }

    pub fn push(&mut self, item: T) {
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }
}

/// Locks a mutex, recovering from poisoning: every section leaves its records consistent
/// before anything that could panic, and a panic in one request must not wedge the sandbox.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Sleeps a fault-injected latency for `api`, if one is set.
    pub async fn injected_latency(&self, api: crate::faults::Api) {
        let delay = lock(&self.faults).take_latency(api);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
    }

    pub async fn late_answer(&self, api: crate::faults::Api) {
        let delay = lock(&self.faults).take_late_answer(api);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
    }

    pub fn take_fail(&self, api: crate::faults::Api) -> Option<crate::faults::FailSpec> {
        lock(&self.faults).take_fail(api)
    }
}

/// A bound, not yet serving sandbox.
pub struct Sandbox {
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Sandbox {
    /// Prepares a sandbox on `listener` (port 0 is fine: see [`Sandbox::local_addr`]). With
    /// `options.write_config`, rewrites `paystream.toml` so its base URLs point at the bound
    /// address.
    pub fn bind(identity: Identity, options: SandboxOptions, listener: TcpListener) -> Result<Self, SandboxError> {
        if !(options.time_scale.is_finite() && options.time_scale > 0.0) {
            return Err(SandboxError::BadTimeScale(options.time_scale));
        }
        let addr = listener.local_addr()?;
        if options.write_config {
            identity.write_config(addr)?;
        }
        let platform = identity.platform_signer()?;
        let merchant_key = identity.merchant_signer()?.verifier_key();
        let certificate = PlatformCertificate::issue(&platform, &identity.mchid);
        let http = reqwest::Client::builder()
            .timeout(options.callback_timeout)
            .no_proxy()
            .user_agent("Mozilla/4.0")
            .build()
            .map_err(|e| SandboxError::Http(e.to_string()))?;
        let mini = MiniState::new(&options.templates, options.max_records);
        let max_records = options.max_records;
        let shared = Arc::new(Shared {
            apiv3_key: identity.apiv3_key_bytes(),
            identity,
            options,
            platform,
            merchant_key,
            certificate,
            pay: Mutex::new(PayState::default()),
            faults: Mutex::new(Faults::default()),
            callbacks: Mutex::new(Journal::new(max_records)),
            mini: Mutex::new(mini),
            sms: Mutex::new(Journal::new(max_records)),
            http,
            background: CancellationToken::new(),
        });
        Ok(Self { shared, listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL for every API of the sandbox.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    /// Serves until `shutdown` fires, then stops accepting, finishes in-flight requests and
    /// cancels pending callback retries.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SandboxError> {
        let background = self.shared.background.clone();
        let app = router(self.shared);
        tracing::info!(addr = %self.addr, "wechat sandbox listening");
        let result = axum::serve(self.listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        background.cancel();
        result.map_err(SandboxError::Io)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        // Pay v3
        .route("/v3/pay/transactions/jsapi", post(pay::prepay_jsapi))
        .route("/v3/pay/transactions/out-trade-no/{no}", get(pay::query_by_out_trade_no))
        .route("/v3/pay/transactions/id/{id}", get(pay::query_by_transaction_id))
        .route("/v3/pay/transactions/out-trade-no/{no}/close", post(pay::close))
        .route("/v3/refund/domestic/refunds", post(pay::create_refund))
        .route("/v3/refund/domestic/refunds/{no}", get(pay::query_refund))
        .route("/v3/certificates", get(pay::certificates))
        // mini-program
        .route("/sns/jscode2session", get(mini::jscode2session))
        .route("/cgi-bin/token", get(mini::token))
        .route("/cgi-bin/stable_token", post(mini::stable_token))
        .route("/cgi-bin/message/subscribe/send", post(mini::subscribe_send))
        // Tencent Cloud SMS (the API host's root path)
        .route("/", post(sms::tencent_api))
        // control
        .route("/sandbox/v1/transactions/{no}/pay", post(control::pay_order))
        .route("/sandbox/v1/transactions/{no}", get(control::get_order))
        .route("/sandbox/v1/callbacks", get(control::callbacks))
        .route("/sandbox/v1/subscribe-messages", get(control::subscribe_messages))
        .route("/sandbox/v1/sms", get(control::sms_messages))
        .route("/sandbox/v1/refunds", get(control::refunds))
        .route("/sandbox/v1/faults", post(control::add_fault))
        .route("/sandbox/v1/templates", axum::routing::put(control::set_templates))
        .route("/sandbox/v1/user-info", post(control::user_info))
        .route("/sandbox/v1/healthz", get(|| async { "ok" }))
        .with_state(shared)
}

/// A sandbox serving on a background task, for tests.
pub struct RunningSandbox {
    pub addr: SocketAddr,
    pub identity: Identity,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), SandboxError>>,
}

impl RunningSandbox {
    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client of this sandbox's control API.
    pub fn control(&self) -> crate::Control {
        crate::Control::new(self.base_url())
    }

    /// Stops the server and waits for it. (Without this the server lives as long as the
    /// runtime: a `#[tokio::test]` runtime ends with its test, taking the sandbox with it.)
    pub async fn stop(self) -> Result<(), SandboxError> {
        self.shutdown.cancel();
        match self.handle.await {
            Ok(r) => r,
            Err(e) => Err(SandboxError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Loads (or creates) the identity in `dir` and serves a sandbox on 127.0.0.1 port 0 with
/// default options.
pub async fn spawn_for_tests(dir: &Path) -> Result<RunningSandbox, SandboxError> {
    spawn_for_tests_with(dir, SandboxOptions::default()).await
}

/// [`spawn_for_tests`] with options (for example a `time_scale` of 1000).
pub async fn spawn_for_tests_with(dir: &Path, options: SandboxOptions) -> Result<RunningSandbox, SandboxError> {
    let identity = load_or_init(dir)?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let sandbox = Sandbox::bind(identity.clone(), options, listener)?;
    let addr = sandbox.local_addr();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(sandbox.run(shutdown.clone()));
    Ok(RunningSandbox { addr, identity, shutdown, handle })
}
