//! Authentication and TLS to NATS, against a private nats-server configured to demand them: the right credentials
//! and certificates connect (and JetStream answers), every wrong one is a configuration error at once, naming what
//! failed and never the secret.

use bus::{BusError, NatsConfig};
use secrecy::SecretString;
use testkit::{NatsServer, TestCa};

const PASSWORD: &str = "pw-7f3a9c1e";

fn config(server: &NatsServer) -> NatsConfig {
    NatsConfig { url: server.url(), ..NatsConfig::default() }
}

async fn refused(cfg: &NatsConfig) -> String {
    match bus::connect(cfg).await {
        Err(BusError::Config(msg)) => msg,
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("connected with a wrong configuration"),
    }
}

#[tokio::test]
async fn user_password_and_mutual_tls() {
    let ca = TestCa::new();
    let server = NatsServer::start_with(&format!(
        "authorization {{ users = [ {{ user: paystream, password: \"{PASSWORD}\" }} ] }}\n\
         tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 2 }}",
        ca.path("server.pem").display(),
        ca.path("server.key").display(),
        ca.path("ca.pem").display(),
    ))
    .await;
    let good = NatsConfig {
        user: Some("paystream".into()),
        password: Some(SecretString::from(PASSWORD.to_owned())),
        tls_ca_file: Some(ca.path("ca.pem")),
        tls_cert_file: Some(ca.path("client.pem")),
        tls_key_file: Some(ca.path("client.key")),
        require_tls: true,
        ..config(&server)
    };
    good.validate().unwrap();
    let (client, js) = bus::connect(&good).await.expect("the right credentials connect");
    js.query_account().await.expect("JetStream answers over the authenticated TLS connection");
    assert!(client.server_info().tls_required, "the server demands TLS");
    drop(client);

    // A wrong password: refused at once, by name, without the password.
    let wrong = NatsConfig { password: Some(SecretString::from("not-the-password".to_owned())), ..good.clone() };
    let msg = refused(&wrong).await;
    assert!(msg.contains("authorization violation"), "{msg}");
    assert!(!msg.contains("not-the-password") && !msg.contains(PASSWORD), "{msg}");

    // No credentials at all.
    let anonymous = NatsConfig { user: None, password: None, ..good.clone() };
    assert!(refused(&anonymous).await.contains("authorization violation"));

    // The server's certificate is not trusted without the private CA.
    let untrusted = NatsConfig { tls_ca_file: None, ..good.clone() };
    let msg = refused(&untrusted).await;
    assert!(msg.contains("TLS"), "{msg}");

    // The server verifies clients: without a client certificate the handshake fails.
    let no_client_cert = NatsConfig { tls_cert_file: None, tls_key_file: None, ..good.clone() };
    let msg = refused(&no_client_cert).await;
    assert!(msg.contains("TLS"), "{msg}");

    // A CA that did not sign the server's certificate.
    let other = TestCa::new();
    let msg = refused(&NatsConfig { tls_ca_file: Some(other.path("ca.pem")), ..good.clone() }).await;
    assert!(msg.contains("TLS"), "{msg}");

    // A missing file is named before any connection is tried.
    let missing = NatsConfig { tls_ca_file: Some(ca.path("nope.pem")), ..good.clone() };
    let msg = refused(&missing).await;
    assert!(msg.contains("nats.tls_ca_file") && msg.contains("nope.pem"), "{msg}");
}

#[tokio::test]
async fn token() {
    let server = NatsServer::start_with("authorization { token: \"tok-5d2e8b\" }").await;
    let good = NatsConfig { token: Some(SecretString::from("tok-5d2e8b".to_owned())), ..config(&server) };
    let (_client, js) = bus::connect(&good).await.expect("the right token connects");
    js.query_account().await.expect("JetStream answers");
    let msg = refused(&NatsConfig { token: Some(SecretString::from("tok-wrong".to_owned())), ..good }).await;
    assert!(msg.contains("authorization violation") && !msg.contains("tok-"), "{msg}");
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required() {
    let server = NatsServer::start().await;
    let msg = refused(&NatsConfig { require_tls: true, ..config(&server) }).await;
    assert!(msg.contains("TLS"), "{msg}");
}

#[test]
fn half_configured_credentials_are_refused_by_name() {
    let base = NatsConfig::default();
    let e = NatsConfig { user: Some("u".into()), ..base.clone() }.validate().unwrap_err();
    assert!(e.contains("nats.user") && e.contains("nats.password"), "{e}");
    let e = NatsConfig { tls_cert_file: Some("c.pem".into()), ..base.clone() }.validate().unwrap_err();
    assert!(e.contains("nats.tls_key_file"), "{e}");
    let e = NatsConfig {
        user: Some("u".into()),
        password: Some(SecretString::from("p".to_owned())),
        token: Some(SecretString::from("t".to_owned())),
        ..base
    }
    .validate()
    .unwrap_err();
    assert!(e.contains("not both"), "{e}");
}
