//! TLS to PostgreSQL (`database.tls = "verify-full"`), against a private server that accepts TLS connections only:
//! the pool, the dedicated (LISTEN) connection and the migrations all go over TLS, and every way the server could
//! fail to prove itself — an unknown CA, a certificate for another name, no TLS at all — refuses the connection
//! instead of falling back to plain text.

use diesel::sql_types::{Bool, Text};
use diesel_async::RunQueryDsl;
use storage::{DbConfig, DbTls};
use testkit::{PgServer, TestCa};

#[derive(diesel::QueryableByName)]
struct Ssl {
    #[diesel(sql_type = Bool)]
    ssl: bool,
    #[diesel(sql_type = Text)]
    version: String,
}

const SSL: &str = "SELECT ssl, COALESCE(version, '') AS version FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

fn verify_full(url: &str, ca: &TestCa) -> DbConfig {
    DbConfig { tls: DbTls::VerifyFull, ca_file: Some(ca.path("ca.pem")), ..DbConfig::new(url) }
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_listen_connection_and_migrations_go_over_verified_tls() {
    let ca = TestCa::new();
    let server = PgServer::start_tls(&ca);
    let cfg = verify_full(&server.url(), &ca);
    cfg.validate().unwrap();

    assert!(storage::migrate(&cfg).await.expect("migrations over TLS") > 0);
    let pool = storage::pool(&cfg).unwrap();
    let mut conn = pool.get().await.expect("a pooled connection over TLS");
    let row: Ssl = diesel::sql_query(SSL).get_result(&mut conn).await.unwrap();
    assert!(row.ssl && row.version.starts_with("TLSv1."), "pooled connection: ssl={} {}", row.ssl, row.version);
    let mut single = storage::connect(&cfg).await.expect("a dedicated connection over TLS");
    let row: Ssl = diesel::sql_query(SSL).get_result(&mut single).await.unwrap();
    assert!(row.ssl, "dedicated connection");
    diesel::sql_query("LISTEN paystream_tls_test").execute(&mut single).await.expect("LISTEN over TLS");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_cannot_prove_itself_is_refused() {
    let ca = TestCa::new();
    let server = PgServer::start_tls(&ca);

    // A CA that did not sign the server's certificate.
    let stranger = TestCa::new();
    let e = storage::connect(&verify_full(&server.url(), &stranger)).await.err().expect("refused");
    assert!(e.to_string().contains("invalid peer certificate: BadSignature"), "{e}");

    // The right CA, but the certificate names localhost, not the host asked for.
    let other_name = format!("postgres://postgres@db.example.internal:{}/postgres?hostaddr=127.0.0.1", server.port);
    let e = storage::connect(&verify_full(&other_name, &ca)).await.err().expect("refused");
    assert!(e.to_string().contains("certificate not valid for name \"db.example.internal\""), "{e}");

    // Plain text is refused by this server (hostnossl reject): TLS off is not silently "better than nothing".
    let e = storage::connect(&DbConfig::new(server.url())).await.err().expect("refused");
    assert!(e.to_string().contains("no encryption"), "{e}");

    // The test cluster of infra.sh speaks no TLS: verify-full does not fall back to plain text.
    let plain = testkit::setting("DATABASE_URL");
    assert!(storage::connect(&verify_full(&plain, &ca)).await.is_err(), "no plain-text fallback");
}

#[test]
fn tls_settings_are_checked() {
    let ca_without_tls = DbConfig { ca_file: Some("ca.pem".into()), ..DbConfig::new("postgres://db/x") };
    assert!(ca_without_tls.validate().unwrap_err().contains("database.tls"));
    let sslmode = DbConfig::new("postgres://db/x?sslmode=require");
    assert!(sslmode.validate().unwrap_err().contains("database.tls"));
    let missing_ca = DbConfig {
        tls: DbTls::VerifyFull,
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..DbConfig::new("postgres://db/x")
    };
    let e = storage::pool(&missing_ca).err().expect("refused").to_string();
    assert!(e.contains("database.ca_file") && e.contains("/nonexistent/ca.pem"), "{e}");
}
