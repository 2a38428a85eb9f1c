//! The README's SDK snippets ("Sending through it from the Nylas SDKs"), run as written
//! with the official Python and Node SDKs against the gateway and the fake Nylas: the first
//! send goes out, the second is refused with 429 `quota_exceeded` and the snippet reads its
//! `Retry-After`; Nylas receives only the send the quota admitted.
//!
//! The SDKs are pinned in `tests/sdk/` (`requirements.txt`, `package.json` and its lock)
//! and installed there by `.ci/run`. Without them the tests say how to install them and
//! pass, except under `CI=true`, where they fail.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{Gateway, TOKEN, WAIT, config, fake};
use fake_nylas::DEMO_GRANT_ID;
use serde_json::Value;
use tokio::process::Command;

/// One message an hour: the second send of a test is refused.
const TINY: &str = "[grants]\ndefault_profile = \"tiny\"\n\
                    [profiles.tiny]\n[[profiles.tiny.windows]]\nperiod = \"1h\"\nmessages = 1\n";

/// One SDK: where it is installed, how to install it, how its snippet runs.
struct Sdk {
    /// The `sdk-snippet` marker in README.md.
    marker: &'static str,
    /// For messages.
    name: &'static str,
    /// What the SDK sends as `User-Agent`, up to its version.
    user_agent: &'static str,
    /// The interpreter.
    program: &'static str,
    /// The snippet's file name in the temporary directory.
    file: &'static str,
}

const PYTHON: Sdk = Sdk {
    marker: "python",
    name: "Python",
    user_agent: "Nylas Python SDK ",
    program: "python3",
    file: "snippet.py",
};

const NODE: Sdk = Sdk {
    marker: "node",
    name: "Node",
    user_agent: "Nylas Node SDK v",
    program: "node",
    file: "snippet.mjs",
};

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pinned version, from `requirements.txt` or `package.json`.
fn pinned(sdk: &Sdk) -> String {
    let dir = sdk_dir();
    if sdk.marker == "python" {
        let pins = read(&dir.join("requirements.txt"));
        let version = pins.lines().find_map(|l| l.trim().strip_prefix("nylas=="));
        version
            .expect("requirements.txt pins nylas==X.Y.Z")
            .to_owned()
    } else {
        let package: Value = serde_json::from_str(&read(&dir.join("package.json"))).unwrap();
        let version = package["dependencies"]["nylas"].as_str();
        version.expect("package.json pins nylas").to_owned()
    }
}

/// Whether the pinned version of the SDK is installed in `tests/sdk/`.
fn installed(sdk: &Sdk, version: &str) -> bool {
    let dir = sdk_dir();
    if sdk.marker == "python" {
        dir.join(format!(".python/nylas-{version}.dist-info"))
            .is_dir()
    } else {
        let package = std::fs::read_to_string(dir.join("node_modules/nylas/package.json"));
        let package: Option<Value> = package.ok().and_then(|p| serde_json::from_str(&p).ok());
        package.is_some_and(|p| p["version"] == version)
    }
}

/// The command that installs the SDK where the test looks for it.
fn install_command(sdk: &Sdk) -> &'static str {
    if sdk.marker == "python" {
        "python3 -m pip install --target crates/gateway/tests/sdk/.python \
         -r crates/gateway/tests/sdk/requirements.txt"
    } else {
        "npm ci --prefix crates/gateway/tests/sdk"
    }
}

/// The pinned version when it is installed. Otherwise `None` after saying how to install
/// it, or, under `CI=true`, a failure: CI must not skip these silently.
fn require(sdk: &Sdk) -> Option<String> {
    let version = pinned(sdk);
    if installed(sdk, &version) {
        return Some(version);
    }
    let missing = format!(
        "the {} SDK (nylas {version}) is not installed in crates/gateway/tests/sdk; \
         install it with `{}` (or run `bash .ci/run`)",
        sdk.name,
        install_command(sdk)
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{missing}");
    // Straight to stderr, past libtest's capture: a passing test's eprintln! is not shown.
    let _ = writeln!(std::io::stderr().lock(), "skipped: {missing}");
    None
}

/// The fenced code block that follows `<!-- sdk-snippet: {marker} -->` in README.md.
fn snippet(marker: &str) -> String {
    let readme = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"));
    let tag = format!("<!-- sdk-snippet: {marker} -->");
    let (_, after) = readme
        .split_once(&tag)
        .unwrap_or_else(|| panic!("README.md has no {tag}"));
    let mut lines = after.trim_start().lines();
    let fence = lines.next().unwrap_or("");
    assert!(
        fence.starts_with("```"),
        "{tag} is not followed by a code block"
    );
    let code: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    assert!(!code.is_empty(), "the code block after {tag} is empty");
    code.join("\n") + "\n"
}

/// Runs the snippet once with the SDK, pointed at `gateway`; returns its stdout, trimmed.
async fn run(sdk: &Sdk, dir: &Path, gateway: &str) -> String {
    let mut cmd = Command::new(sdk.program);
    cmd.arg(dir.join(sdk.file))
        .current_dir(dir)
        .env("NYLAS_API_URI", gateway)
        .env("NYLAS_API_KEY", TOKEN)
        .env("NYLAS_GRANT_ID", DEMO_GRANT_ID)
        // The gateway is on loopback: never through a proxy from the environment.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PYTHONPATH", sdk_dir().join(".python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT * 3, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the {} snippet did not finish", sdk.marker))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", sdk.program));
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "the {} snippet failed ({}):\n{stdout}\n{}",
        sdk.marker,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs the README's snippet for `sdk` twice against a one-message quota.
async fn snippet_sends_then_reads_retry_after(sdk: &Sdk) {
    let Some(version) = require(sdk) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(sdk.file), snippet(sdk.marker)).expect("write snippet");
    if sdk.marker == "node" {
        // An ES module finds its packages from its own directory up, never on NODE_PATH.
        let modules = sdk_dir().join("node_modules");
        std::os::unix::fs::symlink(modules, dir.path().join("node_modules")).expect("link");
    }
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), TINY)).await;

    let first = run(sdk, dir.path(), &gw.url).await;
    let id = first
        .strip_prefix("sent ")
        .unwrap_or_else(|| panic!("the first send goes out and prints `sent <id>`, got {first:?}"));
    assert!(!id.is_empty() && !id.contains(' '), "message id {id:?}");

    let second = run(sdk, dir.path(), &gw.url).await;
    let secs = second
        .strip_prefix("quota exceeded, retry in ")
        .and_then(|s| s.strip_suffix(" s"))
        .unwrap_or_else(|| panic!("the second send is refused, got {second:?}"));
    let secs: u64 = secs
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After in whole seconds, got {second:?}"));
    assert!(
        (1..=2 * 3600).contains(&secs),
        "retry in {secs} s, in a 1h window"
    );

    // Nylas received the one send the quota admitted, from the SDK under test.
    let sends = nylas.sends();
    assert_eq!(sends.len(), 1, "sends Nylas received: {sends:?}");
    assert_eq!(nylas.delivered().len(), 1);
    let agent = sends[0].header("user-agent").unwrap_or("");
    let expected = format!("{}{version}", sdk.user_agent);
    assert!(
        agent.starts_with(&expected),
        "User-Agent {agent:?}, not {expected}"
    );
    let body = sends[0].body_json().expect("a JSON send");
    assert_eq!(body["to"][0]["email"], "alice@example.org", "{body}");
    assert_eq!(gw.used(DEMO_GRANT_ID).await.0, 1);
    gw.shutdown().await;
    nylas.shutdown().await;
}

#[tokio::test]
async fn python_snippet_sends_then_reads_retry_after() {
    snippet_sends_then_reads_retry_after(&PYTHON).await;
}

#[tokio::test]
async fn node_snippet_sends_then_reads_retry_after() {
    snippet_sends_then_reads_retry_after(&NODE).await;
}
