//! `rediss://`: what TLS checks and what it refuses. (The whole contract suite also runs
//! over TLS: `redis_tls_backend` in `contract.rs` and `scheduled.rs`.)

use std::time::Duration;

use limits::{Cost, Profile, QuotaStore, RedisConfig, RedisStore, RedisTls, StoreError};
use testkit::RedisServer;

fn config(url: String, tls: RedisTls) -> RedisConfig {
    RedisConfig {
        url,
        timeout: Duration::from_secs(2),
        tls,
        ..RedisConfig::default()
    }
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).expect("pem")
}

async fn counts(store: &RedisStore) {
    let p = Profile::builtin("icloud").unwrap();
    let d = store
        .reserve("g", &p, Cost::new(1, 1, 0), None)
        .await
        .unwrap();
    assert!(d.is_allowed());
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let server = RedisServer::start_tls(true);
    let certs = server.certs().unwrap();
    let with_cert = RedisTls {
        ca_pem: Some(read(&certs.ca)),
        client_pem: Some((read(&certs.client_cert), read(&certs.client_key))),
        ..RedisTls::default()
    };
    let store = RedisStore::connect(&config(server.tls_url(), with_cert))
        .await
        .unwrap();
    counts(&store).await;
    let without = RedisTls {
        ca_pem: Some(read(&certs.ca)),
        ..RedisTls::default()
    };
    let refused = RedisStore::connect(&config(server.tls_url(), without)).await;
    assert!(refused.is_err(), "connected without the client certificate");
}

#[tokio::test]
async fn an_untrusted_server_is_refused_unless_told_to_skip_verification() {
    let server = RedisServer::start_tls(false);
    // The private CA is not among the system's roots.
    let err = RedisStore::connect(&config(server.tls_url(), RedisTls::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{err:?}"
    );
    let insecure = RedisTls {
        insecure_skip_verify: true,
        ..RedisTls::default()
    };
    let store = RedisStore::connect(&config(server.tls_url(), insecure))
        .await
        .unwrap();
    counts(&store).await;
}

#[tokio::test]
async fn tls_settings_need_a_rediss_url() {
    let tls = RedisTls {
        ca_pem: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
        ..RedisTls::default()
    };
    for url in ["redis://127.0.0.1:1", "redis+cluster://127.0.0.1:1"] {
        let err = RedisStore::lazy(&config(url.into(), tls.clone())).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{url}: {err:?}");
    }
    // Printing a configuration never shows key material.
    let shown = format!(
        "{:?}",
        RedisTls {
            client_pem: Some((b"cert".to_vec(), b"SECRET-KEY".to_vec())),
            ..RedisTls::default()
        }
    );
    assert!(!shown.contains("SECRET"), "{shown}");
}
