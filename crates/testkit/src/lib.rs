//! Test support shared by the workspace's test suites.
//!
//! # Layout
//! - [`RedisServer`]: a private `redis-server` on a free loopback port, which a test can
//!   stop, pause (SIGSTOP) and restart; never the one that may listen on 6379. Optionally
//!   over TLS too, with [`TestCerts`] from a private CA.
//! - [`process`]: a spawned server (`send-gateway`, `fake-nylas`) and the ready lines it
//!   prints on stdout (`NAME listening on URL`, `NAME admin on URL`).
//! - [`multipart`]: `multipart/form-data` bodies built by hand, part header by part header.

pub mod multipart;
pub mod process;
mod tls;
mod topology;

pub use tls::TestCerts;
pub use topology::{RedisCluster, RedisSentinelSet};

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` owned by one test; killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    tls: Option<(u16, TestCerts)>,
}

/// What to tell someone whose machine lacks `redis-server`.
pub const MISSING_REDIS: &str = "redis-server was not found on PATH: the Redis tests need it. \
     Install it (Debian/Ubuntu: `apt-get install -y redis-server`; macOS: `brew install redis`) \
     or run `bash .ci/run`, which installs it";

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    ///
    /// # Panics
    /// When `redis-server` is missing (with [`MISSING_REDIS`]) or does not come up in 10 s:
    /// a Redis test must fail loudly, never pass silently.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sendgw-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            tls: None,
        };
        server.spawn();
        server
    }

    /// A server that also listens with TLS (certificates from a fresh private CA, see
    /// [`RedisServer::certs`]), on a second port; client certificates are checked when
    /// given (`--tls-auth-clients optional`) or, with `require_client_cert`, required. The
    /// plain port stays open for the test's own inspection.
    pub fn start_tls(require_client_cert: bool) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sendgw-redis-{}-{port}", std::process::id()));
        let certs = TestCerts::generate(&dir.join("tls"));
        let tls_port = free_port();
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        let auth = if require_client_cert {
            "yes"
        } else {
            "optional"
        };
        let extra = vec![
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            path(&certs.server_cert),
            "--tls-key-file".to_owned(),
            path(&certs.server_key),
            "--tls-ca-cert-file".to_owned(),
            path(&certs.ca),
            "--tls-auth-clients".to_owned(),
            auth.to_owned(),
        ];
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            extra,
            tls: Some((tls_port, certs)),
        };
        server.spawn();
        server
    }

    /// `rediss://127.0.0.1:<tls port>` of a [`RedisServer::start_tls`] server.
    ///
    /// # Panics
    /// On a server started without TLS.
    pub fn tls_url(&self) -> String {
        let (port, _) = self.tls.as_ref().expect("a TLS server");
        format!("rediss://127.0.0.1:{port}")
    }

    /// The certificates of a [`RedisServer::start_tls`] server.
    pub fn certs(&self) -> Option<&TestCerts> {
        self.tls.as_ref().map(|(_, c)| c)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&self.dir)
        .args(&self.extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{MISSING_REDIS}"),
            Err(e) => panic!("could not start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.command(&["PING"]).is_ok_and(|r| r.contains("PONG")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL): connections drop, data is lost.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port after [`RedisServer::stop`].
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
            assert!(status.is_ok_and(|s| s.success()), "kill -{sig} failed");
        }
    }

    /// Sends one command over a fresh connection and returns the raw RESP reply.
    ///
    /// # Errors
    /// Connection or I/O failures.
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut reader = BufReader::new(s);
        read_reply(&mut reader)
    }

    /// Sends one command and parses an integer reply.
    ///
    /// # Panics
    /// When the reply is not an integer.
    pub fn int(&self, args: &[&str]) -> i64 {
        let r = self.command(args).expect("redis command");
        r.trim()
            .strip_prefix(':')
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("not an integer reply: {r:?}"))
    }
}

/// Reads one whole RESP2 reply as text (nested arrays flattened line by line).
fn read_reply(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut out = line.clone();
    match line.as_bytes().first() {
        Some(b'$') => {
            let n: i64 = line[1..].trim().parse().unwrap_or(-1);
            if n >= 0 {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                out.push_str(&String::from_utf8_lossy(&buf));
            }
        }
        Some(b'*') => {
            let n: i64 = line[1..].trim().parse().unwrap_or(-1);
            for _ in 0..n.max(0) {
                out.push_str(&read_reply(r)?);
            }
        }
        _ => {}
    }
    Ok(out)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}
