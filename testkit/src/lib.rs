//! Helpers for tests that talk to real infrastructure.
//!
//! The infrastructure comes from `scripts/infra.sh up` (run by `make test`): `DATABASE_URL` (an admin URL of a
//! PostgreSQL on which every test creates a database of its own), `NATS_URL` (a nats-server 2.12+ with JetStream)
//! and `NATS_SERVER_BIN` (for tests that need a server of their own to stop and restart). Each variable is taken
//! from the environment, else from `.run/infra.env` at the workspace root.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives in the workspace").to_path_buf()
}

/// A setting from the environment or `.run/infra.env`; panics with the fix when neither has it.
pub fn setting(name: &str) -> String {
    if let Ok(v) = std::env::var(name) {
        return v;
    }
    let file = workspace_root().join(".run/infra.env");
    if let Ok(text) = std::fs::read_to_string(&file) {
        for line in text.lines() {
            if let Some(v) = line.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                return v.to_owned();
            }
        }
    }
    panic!(
        "{name} is not set and {} does not name it: run `scripts/infra.sh up` (or `make test`) first",
        file.display()
    )
}

/// A short random identifier for names of test resources.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A database of its own for one test, dropped (forcefully) when the value is dropped.
pub struct TestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDb {
    /// Creates an empty database; the test runs the migrations it needs (`storage::migrate(&storage::DbConfig::new(&db.url))`).
    pub async fn create() -> TestDb {
        let admin_url = setting("DATABASE_URL");
        let name = unique("ps_test_");
        let mut conn = AsyncPgConnection::establish(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL (is Postgres up? scripts/infra.sh up): {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create test database");
        let url = match admin_url.rfind('/') {
            Some(i) if !admin_url[..i].ends_with('/') => format!("{}/{name}", &admin_url[..i]),
            _ => format!("{}/{name}", admin_url.trim_end_matches('/')),
        };
        TestDb { url, admin_url, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut conn = AsyncPgConnection::establish(&admin).await.ok()?;
                diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await.ok()
            })
        })
        .join();
    }
}

/// The shared test NATS server's URL.
pub fn nats_url() -> String {
    setting("NATS_URL")
}

pub async fn nats() -> async_nats::Client {
    async_nats::connect(nats_url()).await.expect("connect to NATS_URL (scripts/infra.sh up)")
}

/// Waits until `check` returns `Some`, polling every 20 ms, and panics with `what` after `timeout`.
/// Tests wait on conditions, never on the clock.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A server's name, from its store directory (unique per server).
fn server_name(store: &Path) -> String {
    store.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Whether the nats-server on `port` is the one called `name` (its INFO line, sent first on every connection).
fn answers_as(port: u16, name: &str) -> bool {
    use std::io::{BufRead, BufReader};
    let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut info = String::new();
    BufReader::new(stream).read_line(&mut info).is_ok() && info.contains(&format!("\"server_name\":\"{name}\""))
}

/// A nats-server of the test's own, for tests that stop and restart the broker. Killed on drop.
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    /// Extra nats-server configuration (`authorization`, `tls`, …), when started with [`NatsServer::start_with`].
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_on_a_free_port(None).await
    }

    /// Starts a server whose configuration file also holds `extra` (nats-server's configuration syntax), for
    /// tests of authentication and TLS.
    pub async fn start_with(extra: &str) -> NatsServer {
        Self::start_on_a_free_port(Some(extra)).await
    }

    /// A free port can be taken by another test's server between our look and our bind (tests run in parallel):
    /// then our server exits, and we try another port.
    async fn start_on_a_free_port(extra: Option<&str>) -> NatsServer {
        for _ in 0..5 {
            let store = std::env::temp_dir().join(unique("paystream-nats-"));
            std::fs::create_dir_all(&store).expect("nats store dir");
            let port = free_port();
            let config = extra.map(|extra| {
                let config = store.join("nats.conf");
                let text = format!(
                    "listen: \"127.0.0.1:{port}\"\nserver_name: \"{}\"\njetstream {{ store_dir: \"{}\" }}\n{extra}\n",
                    server_name(&store),
                    store.join("js").display()
                );
                std::fs::write(&config, text).expect("nats config");
                config
            });
            let mut server = NatsServer { port, store, config, child: None };
            if server.try_start().await {
                return server;
            }
        }
        panic!("no private nats-server came up on five free ports");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store (JetStream data survives a stop).
    pub async fn restart(&mut self) {
        assert!(self.try_start().await, "private nats-server did not come back on port {}", self.port);
    }

    /// Starts the server and waits until it answers as itself: the INFO line carries its own name, so a server of
    /// another test on the same port does not count. False when it exited instead (its port was taken).
    async fn try_start(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let name = server_name(&self.store);
        let mut cmd = Command::new(setting("NATS_SERVER_BIN"));
        match &self.config {
            Some(config) => cmd.arg("-c").arg(config),
            None => {
                cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-n", &name, "-js", "-sd"]).arg(&self.store)
            }
        };
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn NATS_SERVER_BIN");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if answers_as(self.port, &name) {
                return true;
            }
            assert!(Instant::now() < deadline, "private nats-server on port {} did not answer within 10s", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: no lame-duck, like a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A JetStream cluster of nats-servers on loopback (a test's own), for tests of replicated streams and node loss.
/// Killed on drop.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

struct ClusterNode {
    port: u16,
    config: PathBuf,
    child: Option<Child>,
}

impl NatsCluster {
    /// Starts `n` nodes routed to each other and waits until JetStream has a meta leader (streams can be created).
    pub async fn start(n: usize) -> NatsCluster {
        let dir = std::env::temp_dir().join(unique("paystream-cluster-"));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports.iter().map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\"")).collect();
        let mut nodes = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let store = dir.join(format!("n{i}"));
            let config = dir.join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: paystream-test\n listen: \"127.0.0.1:{cport}\"\n routes: [{}] }}\n",
                store.display(),
                routes.join(", ")
            );
            std::fs::write(&config, text).expect("node config");
            nodes.push(ClusterNode { port: *port, config, child: None });
        }
        let mut cluster = NatsCluster { nodes, dir };
        for i in 0..n {
            cluster.start_node(i);
        }
        let url = cluster.url();
        eventually(Duration::from_secs(30), "the JetStream cluster to elect a meta leader", || {
            let url = url.clone();
            async move {
                let servers: Vec<&str> = url.split(',').collect();
                let client = async_nats::connect(servers).await.ok()?;
                let js = async_nats::jetstream::new(client);
                js.query_account().await.ok().map(|_| ())
            }
        })
        .await;
        cluster
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {i} already running");
        let child = Command::new(setting("NATS_SERVER_BIN"))
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn NATS_SERVER_BIN");
        node.child = Some(child);
    }

    /// Every node's URL, comma-separated (what a client is given to fail over between them).
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// Kills node `i` with SIGKILL (a crash: no lame-duck mode).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private certificate authority of a test, with a server certificate for `localhost` and `127.0.0.1` and a client
/// certificate, written as PEM files into a directory of its own (removed on drop): for tests of TLS to NATS and
/// PostgreSQL.
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    /// Files: `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key` (keys mode 0600).
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let dir = std::env::temp_dir().join(unique("paystream-ca-"));
        std::fs::create_dir_all(&dir).expect("ca dir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "paystream test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca_cert = ca.self_signed(&ca_key).expect("ca certificate");
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write pem");
            if name.ends_with(".key") {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
            }
        };
        write("ca.pem", ca_cert.pem());
        for (name, sans, eku) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            ),
            ("client", vec!["paystream".to_owned()], rcgen::ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![eku];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        TestCa { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server of the test's own that accepts only TLS connections over TCP (`hostssl`), with the server
/// certificate of a [`TestCa`], for tests of `database.tls`. Programs from `PG_BIN` (`.run/infra.env`). Stopped and
/// removed on drop.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PgServer {
    /// initdb, certificates, `pg_ctl start -w` (blocking: a second or two).
    pub fn start_tls(ca: &TestCa) -> PgServer {
        let bin = PathBuf::from(setting("PG_BIN"));
        let dir = std::env::temp_dir().join(unique("paystream-pg-"));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).expect("pg dir");
        chown_postgres(&dir);
        run_ok(as_postgres(Command::new(bin.join("initdb")).arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-locale",
        ])));
        for (from, to) in [("server.pem", "server.crt"), ("server.key", "server.key")] {
            std::fs::copy(ca.path(from), data.join(to)).expect("copy the server certificate");
            chown_postgres(&data.join(to));
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
        )
        .expect("pg_hba.conf");
        let port = free_port();
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c fsync=off", dir.display());
        run_ok(as_postgres(
            Command::new(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "30", "-o", &options, "start"]),
        ));
        PgServer { port, dir, bin }
    }

    /// `postgres://postgres@localhost:PORT/postgres` (a name the server certificate carries).
    pub fn url(&self) -> String {
        format!("postgres://postgres@localhost:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ =
            as_postgres(Command::new(self.bin.join("pg_ctl")).arg("-D").arg(&data).args(["-m", "immediate", "stop"]))
                .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this process runs as root (from `/proc/self/status`: no libc call needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// PostgreSQL refuses to run as root: as root, its programs run as `postgres`, which must own their files.
fn as_postgres(cmd: &mut Command) -> Command {
    if !is_root() {
        let mut same = Command::new(cmd.get_program());
        same.args(cmd.get_args());
        return same;
    }
    let mut r = Command::new("runuser");
    r.args(["-u", "postgres", "--"]).arg(cmd.get_program()).args(cmd.get_args());
    r
}

fn chown_postgres(path: &Path) {
    if is_root() {
        let mut chown = Command::new("chown");
        chown.arg("postgres").arg(path);
        run_ok(chown);
    }
}

fn run_ok(mut cmd: Command) {
    let out = cmd.output().expect("run a command");
    assert!(out.status.success(), "{:?}: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr));
}
