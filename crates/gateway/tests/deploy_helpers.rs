//! The `deploy_*` suites' own parsers ([`deploy_support`]) read what they claim to, and
//! `check-config` layers its sources the way the deployment files rely on.

mod deploy_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use deploy_support::{
    MetricType, check_config, config_arg, describe, effective, exposed_names, host_port,
    metric_tokens, quantity_bytes, registered_metrics, with_config_path,
};

#[test]
fn helpers_parse_what_they_claim() {
    assert_eq!(quantity_bytes("128Mi"), Some(128 << 20));
    assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
    assert_eq!(quantity_bytes("65536"), Some(65536));
    assert_eq!(
        host_port("redis://:pw@redis.example.svc:6379/0"),
        Some(("redis.example.svc".to_owned(), 6379))
    );
    assert_eq!(
        metric_tokens("rate(sendgw_a_total[5m]) / xsendgw_b sendgw_c{x}"),
        ["sendgw_a_total", "sendgw_c"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
    let args: Vec<String> = ["--log-format", "json", "--config=/x.toml"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(config_arg(&args), Some((2, "/x.toml".to_owned())));
    assert_eq!(
        with_config_path(&args, 2, Path::new("/tmp/y.toml"))[2],
        "--config=/tmp/y.toml"
    );
    // Flags beat the environment, which beats the file (compose.yaml relies on it).
    let env = [(
        "SEND_GATEWAY__SERVER__LISTEN".to_owned(),
        "0.0.0.0:2".to_owned(),
    )];
    let out = check_config(&["--listen".to_owned(), "0.0.0.0:3".to_owned()], &env);
    let eff = effective(&out).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    assert_eq!(eff.listen.to_string(), "0.0.0.0:3");
    assert_eq!(eff.admin.to_string(), "127.0.0.1:9090");
    assert_eq!(eff.shutdown_grace, Duration::from_secs(25));
    let kinds: BTreeMap<String, MetricType> = registered_metrics().into_iter().collect();
    assert_eq!(kinds.get("sendgw_decisions"), Some(&MetricType::Counter));
    assert_eq!(
        kinds.get("sendgw_store_duration_seconds"),
        Some(&MetricType::Histogram)
    );
    assert_eq!(
        kinds.get("sendgw_requests_in_flight"),
        Some(&MetricType::Gauge)
    );
    let exposed = exposed_names();
    for name in [
        "sendgw_decisions_total",
        "sendgw_store_duration_seconds_bucket",
        "sendgw_store_duration_seconds_count",
        "sendgw_requests_in_flight",
    ] {
        assert!(exposed.contains(name), "{name} in {exposed:?}");
    }
    assert!(!exposed.contains("sendgw_decisions"), "{exposed:?}");
}
