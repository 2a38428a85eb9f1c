//! The `fake-nylas` binary: ready line, demo grant, shutdown on SIGTERM.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TOKEN, client};
use fake_nylas::{DEMO_GRANT_EMAIL, DEMO_GRANT_ID};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn the_binary_prints_its_address_and_serves_the_demo_grant() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-nylas"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a ready line within 10 s")
        .unwrap()
        .expect("a first line");
    let url = testkit::process::listening_url("fake-nylas", &ready).expect("the ready line format");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let grant_line = lines.next_line().await.unwrap().unwrap();
    assert!(grant_line.contains(DEMO_GRANT_ID) && grant_line.contains(DEMO_GRANT_EMAIL));

    let response = client()
        .get(format!("{url}/v3/grants/{DEMO_GRANT_EMAIL}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    #[cfg(unix)]
    {
        let pid = child.id().expect("still running").to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}
