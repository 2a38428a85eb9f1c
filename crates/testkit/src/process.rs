//! The workspace's servers run as processes: once they serve, they print ready lines on
//! stdout, `NAME listening on URL` (and `send-gateway` also `send-gateway admin on URL`).
//! [`ready_line`] reads one such line; [`Server`] spawns a program and waits for them.
//!
//! Nothing here depends on the programs' crates: the caller passes the binary's path
//! (`env!("CARGO_BIN_EXE_send-gateway")`).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a ready line announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// `NAME listening on URL`: the main listener.
    Listening(String),
    /// `NAME admin on URL`: the admin listener.
    Admin(String),
}

/// Reads `line` as a ready line of `program`: `program listening on URL` or
/// `program admin on URL`, URL not empty. Anything else is `None`.
///
/// ```
/// use testkit::process::{Ready, ready_line};
/// assert_eq!(
///     ready_line("send-gateway", "send-gateway admin on http://127.0.0.1:9"),
///     Some(Ready::Admin("http://127.0.0.1:9".into()))
/// );
/// assert_eq!(ready_line("send-gateway", "fake-nylas listening on http://x"), None);
/// ```
pub fn ready_line(program: &str, line: &str) -> Option<Ready> {
    let rest = line.strip_prefix(program)?.strip_prefix(' ')?;
    let (url, ready): (&str, fn(String) -> Ready) =
        if let Some(url) = rest.strip_prefix("listening on ") {
            (url, Ready::Listening)
        } else {
            (rest.strip_prefix("admin on ")?, Ready::Admin)
        };
    let url = url.trim();
    (!url.is_empty()).then(|| ready(url.to_owned()))
}

/// The URL of `program listening on URL`, when `line` is that.
pub fn listening_url(program: &str, line: &str) -> Option<String> {
    match ready_line(program, line)? {
        Ready::Listening(url) => Some(url),
        Ready::Admin(_) => None,
    }
}

/// `send-gateway --config CONFIG` at `bin`, with `RUST_LOG=warn` and without
/// `SEND_GATEWAY_CONFIG` from this process; the caller may change any of that.
pub fn send_gateway(bin: impl AsRef<OsStr>, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("SEND_GATEWAY_CONFIG");
    cmd
}

/// The names of this process's environment variables that start with `prefix`, in any
/// case: what a test removes from a child that must see only the variables it sets.
pub fn vars_with_prefix(prefix: &str) -> Vec<std::ffi::OsString> {
    let prefix = prefix.to_ascii_uppercase();
    std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_str()
                .is_some_and(|n| n.to_ascii_uppercase().starts_with(&prefix))
        })
        .collect()
}

/// Which ready lines [`Server::spawn`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `NAME listening on URL` only.
    Listening,
    /// `NAME listening on URL` and `NAME admin on URL`, in either order.
    ListeningAndAdmin,
}

/// A spawned server; killed (and reaped) when dropped, whatever the test did.
///
/// A thread keeps reading its stdout, so it never blocks on a full pipe; the lines that
/// follow the ready lines are kept for [`Server::next_line`].
#[derive(Debug)]
pub struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    url: String,
    admin: Option<String>,
}

impl Server {
    /// Spawns `cmd` (stdin closed, stdout piped; stderr as the caller set it) and waits up
    /// to `limit` for the ready lines of `program` that `expect` names.
    ///
    /// # Panics
    /// When the program cannot start, or has not printed them within `limit` (the panic
    /// gives its exit status, if it has exited).
    pub fn spawn(cmd: &mut Command, program: &str, expect: Expect, limit: Duration) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            lines,
            url: String::new(),
            admin: None,
        };
        let deadline = Instant::now() + limit;
        while server.url.is_empty()
            || (expect == Expect::ListeningAndAdmin && server.admin.is_none())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = server.lines.recv_timeout(left) else {
                let status = server.child.try_wait().ok().flatten();
                panic!(
                    "{program} printed no ready line{} within {limit:?} (exit status: {status:?})",
                    if expect == Expect::Listening { "" } else { "s" }
                )
            };
            match ready_line(program, &line) {
                Some(Ready::Listening(url)) => server.url = url,
                Some(Ready::Admin(url)) => server.admin = Some(url),
                None => {}
            }
        }
        server
    }

    /// The main listener's URL, as the ready line gave it (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin listener's URL, when the program printed one before it was ready.
    pub fn admin(&self) -> Option<&str> {
        self.admin.as_deref()
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line after those read so far, if one comes within `limit`.
    pub fn next_line(&self, limit: Duration) -> Option<String> {
        self.lines.recv_timeout(limit).ok()
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) with `kill(1)`.
    ///
    /// # Panics
    /// When `kill` fails.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// The exit status, if the process has exited.
    ///
    /// # Panics
    /// When the status cannot be read.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_are_read_for_their_program_only() {
        let gw = "send-gateway";
        assert_eq!(
            ready_line(gw, "send-gateway listening on http://127.0.0.1:80"),
            Some(Ready::Listening("http://127.0.0.1:80".into()))
        );
        assert_eq!(
            ready_line(gw, "send-gateway admin on http://127.0.0.1:81 "),
            Some(Ready::Admin("http://127.0.0.1:81".into()))
        );
        for other in [
            "send-gateway listening on ",
            "send-gatewaylistening on http://x",
            "fake-nylas listening on http://x",
            "demo grant: g1 <demo@example.org>",
            "",
        ] {
            assert_eq!(ready_line(gw, other), None, "{other:?}");
        }
        assert_eq!(
            listening_url("fake-nylas", "fake-nylas listening on http://127.0.0.1:1"),
            Some("http://127.0.0.1:1".into())
        );
        assert_eq!(listening_url(gw, "send-gateway admin on http://x"), None);
    }

    #[test]
    fn a_server_is_ready_once_it_printed_its_lines() {
        let script = "echo starting; echo 'srv admin on http://a'; \
                      echo 'srv listening on http://l'; echo after; exec sleep 30";
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let mut server = Server::spawn(
            &mut cmd,
            "srv",
            Expect::ListeningAndAdmin,
            Duration::from_secs(10),
        );
        assert_eq!(server.url(), "http://l");
        assert_eq!(server.admin(), Some("http://a"));
        assert_eq!(
            server.next_line(Duration::from_secs(10)).as_deref(),
            Some("after")
        );
        assert_eq!(server.try_wait(), None);
        server.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.try_wait().is_none() {
            assert!(Instant::now() < deadline, "sh did not exit after TERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    #[should_panic(expected = "srv printed no ready line")]
    fn a_server_that_never_gets_ready_fails_loudly() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'srv admin on http://a'"]);
        let _ = Server::spawn(&mut cmd, "srv", Expect::Listening, Duration::from_secs(2));
    }

    #[test]
    fn variables_are_matched_by_prefix_in_any_case() {
        let names = vars_with_prefix("PAT");
        assert!(names.iter().any(|n| n == "PATH"), "{names:?}");
        assert!(
            vars_with_prefix("no_such_prefix_").is_empty(),
            "{:?}",
            vars_with_prefix("no_such_prefix_")
        );
    }
}
