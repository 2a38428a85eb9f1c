//! Side-by-side load benchmark: send-gateway against nginx
//! (`cargo bench -p gateway --bench proxy`).
//!
//! Everything runs on loopback. One nginx instance is the upstream: it answers every request
//! (any method, any path) with a fixed Nylas-shaped send answer, so it is the same for both
//! proxies and costs little. The proxies under test are the release `send-gateway` (memory
//! store, a profile that never denies, logging at its default `info` level into a file) and
//! a second nginx doing `proxy_pass` with keep-alive upstream connections.
//!
//! CPU allotment on a 2-core machine: each proxy under test runs under `taskset -c 0`
//! (nginx with `worker_processes 1`, send-gateway with `TOKIO_WORKER_THREADS=1`, so one
//! tokio worker); this process (the load generator, one tokio thread) and the upstream nginx
//! are pinned to core 1. CPU per request is the proxy's utime+stime from `/proc/PID/stat`
//! (all threads; for nginx master and worker) over the requests answered.
//!
//! Scenarios, interleaved round by round (the order rotates each round):
//! - closed loop, `CONNS` connections each sending back to back, `SECS` seconds:
//!   direct to the upstream, nginx GET, send-gateway GET (pass-through), nginx POST send
//!   and send-gateway POST send (the quota path);
//! - open loop at `RATE` req/s for `RATE_SECS` seconds, one latency sample per request:
//!   direct, nginx GET, send-gateway GET and send-gateway send. "Added" latency is the
//!   proxy's percentile minus the direct one, from the same rounds.
//!
//! Knobs (environment): `BENCH_ROUNDS` (3), `BENCH_SECS` (3), `BENCH_CONNS` (32),
//! `BENCH_RATE` (1000), `BENCH_RATE_SECS` (5). Every run stops at its deadline or after
//! `MAX_REQUESTS`, whichever comes first. It exits non-zero if any request fails or nginx
//! is missing; nothing depends on timing. `crates/gateway/BENCHMARKS.md` records figures.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

const GRANT: &str = "6f1c3a52-7d0e-4b8a-9c61-2f4d5e8a9b10";
const SEND_BODY: &str = r#"{"to":[{"email":"a@example.org"}],"subject":"s","body":"b"}"#;
/// Hard cap on the requests of one run, besides its deadline.
const MAX_REQUESTS: u64 = 2_000_000;
/// Connections of the open-loop runs (each carries RATE / OPEN_CONNS req/s).
const OPEN_CONNS: usize = 16;

fn upstream_answer() -> String {
    format!(
        r#"{{"request_id":"bench","grant_id":"{GRANT}","data":{{"id":"m1","grant_id":"{GRANT}","to":[{{"email":"a@example.org"}}],"cc":[],"bcc":[],"attachments":[]}}}}"#
    )
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Processes

/// A process under our control; stopped (TERM, then KILL) on drop.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its children (nginx: master and workers).
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        pids.extend(children(self.pid()));
        pids
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on TERM; killing it", self.name);
        for pid in children(self.pid()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fields of `/proc/PID/stat` after the command name (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field 3 (state) is a letter; keep positions by mapping it to 0.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat_fields(*pid).and_then(|f| f.get(1).copied()) == Some(u64::from(parent)))
        .collect()
}

/// utime + stime in clock ticks, summed over `pids` (each includes all its threads).
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| stat_fields(*pid))
        // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 from field 3.
        .map(|f| f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
        .sum()
}

/// Busy clock ticks of cores 0 and 1 so far, from `/proc/stat` (all processes).
fn core_busy() -> [u64; 2] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut out = [0; 2];
    for (i, name) in ["cpu0 ", "cpu1 "].iter().enumerate() {
        if let Some(l) = stat.lines().find(|l| l.starts_with(name)) {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            // user nice system idle iowait irq softirq steal: busy is all but idle, iowait.
            let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
            out[i] = f.iter().take(8).sum::<u64>() - idle;
        }
    }
    out
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("nginx"));
    on_path
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
}

fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `taskset -c CORE` before `program`, when pinning is on.
fn pinned(core: Option<&str>, program: &Path) -> Command {
    match core {
        Some(core) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(core).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn start_nginx(
    nginx: &Path,
    dir: &Path,
    name: &'static str,
    core: Option<&str>,
    http_block: &str,
) -> Proc {
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("tmp")).unwrap();
    let p = prefix.display();
    let conf = format!(
        "worker_processes 1;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         access_log off;\n\
         client_body_temp_path {p}/tmp/body;\n\
         proxy_temp_path {p}/tmp/proxy;\n\
         keepalive_requests 100000000;\n\
         keepalive_timeout 300s;\n\
         {http_block}\n\
         }}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = pinned(core, nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nginx");
    Proc { name, child }
}

fn start_gateway(dir: &Path, core: Option<&str>, upstream: SocketAddr) -> (Proc, SocketAddr) {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
url = "http://{upstream}"
timeout = "10s"

[store]
backend = "memory"

[grants]
default_profile = "bench"

[profiles.bench]
max_recipients_per_message = 100
max_message_size = "20MB"

[[profiles.bench.windows]]
period = "24h"
messages = 1000000000
recipients = 1000000000
"#
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    let mut child = pinned(core, Path::new(env!("CARGO_BIN_EXE_send-gateway")))
        .arg("--config")
        .arg(&path)
        // Default `info` level, as operators run it: one line per send decision.
        .env_remove("RUST_LOG")
        // One tokio worker thread: the same allowance as nginx's one worker process.
        .env("TOKIO_WORKER_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn send-gateway");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines
        .next()
        .and_then(Result::ok)
        .and_then(|l| {
            l.strip_prefix("send-gateway listening on http://")
                .and_then(|a| a.parse().ok())
        })
        .expect("send-gateway's ready line");
    // Drain the rest of stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (
        Proc {
            name: "send-gateway",
            child,
        },
        addr,
    )
}

// ---------------------------------------------------------------------------------------
// Load generator

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    send: bool,
}

impl Target {
    fn request(&self) -> hyper::Request<Full<Bytes>> {
        let b = hyper::Request::builder()
            .header("host", self.addr.to_string())
            .header("authorization", "Bearer k");
        if self.send {
            b.method("POST")
                .uri(format!("/v3/grants/{GRANT}/messages/send"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(SEND_BODY.as_bytes())))
        } else {
            b.method("GET")
                .uri(format!("/v3/grants/{GRANT}/messages?limit=5"))
                .body(Full::new(Bytes::new()))
        }
        .unwrap()
    }
}

type Conn = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Conn {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// One request; true if answered 200 with the whole body read.
async fn exchange(conn: &mut Conn, target: &Target) -> bool {
    if conn.ready().await.is_err() {
        return false;
    }
    match conn.send_request(target.request()).await {
        Ok(resp) => {
            let ok = resp.status() == 200;
            resp.into_body().collect().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

/// Sends one request and returns (status, body), to check a scenario before timing it.
async fn probe(target: &Target) -> (u16, String) {
    let mut conn = connect(target.addr).await;
    conn.ready().await.expect("ready");
    let resp = conn
        .send_request(target.request())
        .await
        .expect("probe request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("probe body");
    (
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    )
}

#[derive(Clone, Copy, Default)]
struct Run {
    ok: u64,
    failed: u64,
    secs: f64,
    cpu_ticks: u64,
    /// Busy ticks of cores 0 and 1 (every process) during the run.
    core_ticks: [u64; 2],
}

/// Closed loop: `conns` connections, each sending its next request as soon as the last is
/// answered, until `secs` pass or MAX_REQUESTS are sent.
async fn closed_loop(target: &Target, pids: &[u32], conns: usize, secs: f64) -> Run {
    let mut connections = Vec::with_capacity(conns);
    for _ in 0..conns {
        connections.push(connect(target.addr).await);
    }
    // Warm up: the proxy's upstream pool fills, lazy state is built.
    let warm = Instant::now() + Duration::from_millis(300);
    let sent = Arc::new(AtomicU64::new(0));
    let connections = run_conns(connections, target, warm, &sent).await.0;
    sent.store(0, Ordering::Relaxed);

    let cpu0 = cpu_ticks(pids);
    let cores0 = core_busy();
    let t0 = Instant::now();
    let (_, ok, failed) = run_conns(
        connections,
        target,
        t0 + Duration::from_secs_f64(secs),
        &sent,
    )
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cores1 = core_busy();
    Run {
        ok,
        failed,
        secs: elapsed,
        cpu_ticks: cpu_ticks(pids) - cpu0,
        core_ticks: [cores1[0] - cores0[0], cores1[1] - cores0[1]],
    }
}

async fn run_conns(
    connections: Vec<Conn>,
    target: &Target,
    until: Instant,
    sent: &Arc<AtomicU64>,
) -> (Vec<Conn>, u64, u64) {
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|mut conn| {
            let (target, sent) = (target.clone(), sent.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < until && sent.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS
                {
                    if exchange(&mut conn, &target).await {
                        ok += 1;
                    } else {
                        failed += 1;
                        if failed > 100 {
                            break;
                        }
                    }
                }
                (conn, ok, failed)
            })
        })
        .collect();
    let (mut conns, mut ok, mut failed) = (Vec::new(), 0, 0);
    for t in tasks {
        let (c, o, f) = t.await.unwrap();
        conns.push(c);
        ok += o;
        failed += f;
    }
    (conns, ok, failed)
}

#[derive(Clone, Copy, Default)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    failed: u64,
    cpu_ticks: u64,
    n: u64,
}

/// Open loop: `rate` requests a second for `secs`, request i due at t0 + i/rate whatever
/// happened before, spread over OPEN_CONNS connections. A request's latency runs from when it
/// started (the timer may wake late; that is not the proxy's) or, if its connection was still
/// busy when it was due, from when it was due (no coordinated omission).
async fn open_loop(target: &Target, pids: &[u32], rate: u64, secs: u64) -> Latency {
    let n = (rate * secs).min(MAX_REQUESTS);
    let mut connections = Vec::with_capacity(OPEN_CONNS);
    for _ in 0..OPEN_CONNS {
        let mut c = connect(target.addr).await;
        for _ in 0..10 {
            exchange(&mut c, target).await;
        }
        connections.push(c);
    }
    let cpu0 = cpu_ticks(pids);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(10);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(k, mut conn)| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut failed = 0u64;
                let mut i = k as u64;
                while i < n {
                    let due = t0 + period * i as u32;
                    let start = if tokio::time::Instant::now() > due {
                        due.into_std()
                    } else {
                        tokio::time::sleep_until(due).await;
                        Instant::now()
                    };
                    if exchange(&mut conn, &target).await {
                        samples.push(start.elapsed().as_nanos() as u64);
                    } else {
                        failed += 1;
                    }
                    i += OPEN_CONNS as u64;
                }
                (samples, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::with_capacity(n as usize), 0);
    for t in tasks {
        let (s, f) = t.await.unwrap();
        all.extend(s);
        failed += f;
    }
    let cpu = cpu_ticks(pids) - cpu0;
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let idx = ((p * all.len() as f64).ceil() as usize).clamp(1, all.len()) - 1;
        all[idx] as f64 / 1000.0
    };
    Latency {
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: pct(1.0),
        failed,
        cpu_ticks: cpu,
        n: all.len() as u64,
    }
}

// ---------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

struct Scenario {
    name: &'static str,
    target: Target,
    pids: Vec<u32>,
    /// Measured at the fixed rate too.
    latency: bool,
    /// The measured process runs on core 0 (a proxy under test; not the upstream).
    on_core0: bool,
    runs: Vec<Run>,
    lat: Vec<Latency>,
}

impl Scenario {
    fn rps(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.ok as f64 / r.secs).collect()
    }
    fn cpu_us(&self, tick_us: f64) -> Vec<f64> {
        self.runs
            .iter()
            .map(|r| r.cpu_ticks as f64 * tick_us / r.ok.max(1) as f64)
            .collect()
    }
    /// Percent of one core: the proxy's own CPU time over wall time.
    fn busy(&self, tick_us: f64) -> Vec<f64> {
        self.runs
            .iter()
            .map(|r| r.cpu_ticks as f64 * tick_us / (r.secs * 1e6) * 100.0)
            .collect()
    }
    /// Percent of core 0 used by anything but the proxy under test (for the direct runs,
    /// everything on core 0): other work on the machine.
    fn core0_others(&self, tick_us: f64, proxy_on_core0: bool) -> Vec<f64> {
        self.runs
            .iter()
            .map(|r| {
                let own = if proxy_on_core0 { r.cpu_ticks } else { 0 };
                r.core_ticks[0].saturating_sub(own) as f64 * tick_us / (r.secs * 1e6) * 100.0
            })
            .collect()
    }
    /// Percent of core 1 busy (load generator, upstream, anything else).
    fn core1(&self, tick_us: f64) -> Vec<f64> {
        self.runs
            .iter()
            .map(|r| r.core_ticks[1] as f64 * tick_us / (r.secs * 1e6) * 100.0)
            .collect()
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let Some(nginx) = find_nginx() else {
        eprintln!(
            "proxy bench: nginx not found on PATH or at /usr/sbin/nginx.\n\
             Install it, e.g. `apt-get install nginx-light` (or `nginx`), then run again."
        );
        return ExitCode::FAILURE;
    };
    let rounds = env_num("BENCH_ROUNDS", 3) as usize;
    let secs = env_num("BENCH_SECS", 3) as f64;
    let conns = env_num("BENCH_CONNS", 32) as usize;
    let rate = env_num("BENCH_RATE", 1000);
    let rate_secs = env_num("BENCH_RATE_SECS", 5);
    let tick_us = 1e6 / clock_ticks_per_sec() as f64;

    // Pinning: proxies under test on core 0, this process (load) and the upstream on core 1.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let have_taskset = Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let pin = cores >= 2 && have_taskset;
    let (proxy_core, load_core) = if pin {
        (Some("0"), Some("1"))
    } else {
        eprintln!(
            "proxy bench: NOT pinning (cores: {cores}, taskset: {have_taskset}); figures are not comparable with pinned runs"
        );
        (None, None)
    };
    if let Some(core) = load_core {
        // All threads of this process, before any runtime exists; children inherit it.
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", core, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("taskset");
        assert!(status.success(), "taskset on the bench process");
    }

    let dir = tempfile::Builder::new()
        .prefix("sendgw-proxy-bench")
        .tempdir()
        .unwrap();
    let upstream_addr: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let nginx_addr: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let answer = upstream_answer();
    let upstream = start_nginx(
        &nginx,
        dir.path(),
        "upstream",
        load_core,
        &format!(
            "default_type application/json;\n\
             server {{ listen {upstream_addr}; location / {{ return 200 '{answer}'; }} }}"
        ),
    );
    let proxy_nginx = start_nginx(
        &nginx,
        dir.path(),
        "nginx",
        proxy_core,
        &format!(
            "upstream up {{ server {upstream_addr}; keepalive 64; keepalive_requests 100000000; }}\n\
             server {{ listen {nginx_addr}; location / {{\n\
             proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
             }} }}"
        ),
    );
    wait_for_port(upstream_addr, "upstream nginx");
    wait_for_port(nginx_addr, "nginx under test");
    let (gateway, gateway_addr) = start_gateway(dir.path(), proxy_core, upstream_addr);
    // nginx forks its worker after it listens; let it settle before listing children.
    std::thread::sleep(Duration::from_millis(300));

    let nginx_version = Command::new(&nginx)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    println!("load average at start: {}", loadavg());
    println!(
        "proxy bench: {nginx_version}; {cores} cores; pinned: {pin}; {rounds} rounds; closed loop {conns} connections x {secs} s; open loop {rate} req/s x {rate_secs} s over {OPEN_CONNS} connections"
    );
    println!(
        "upstream {upstream_addr} (nginx pids {:?}), nginx under test {nginx_addr} (pids {:?}), send-gateway {gateway_addr} (pid {}, TOKIO_WORKER_THREADS=1, log level info -> {})",
        upstream.pids(),
        proxy_nginx.pids(),
        gateway.pid(),
        dir.path().join("gateway.log").display()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |addr| Target { addr, send: false };
    let post = |addr| Target { addr, send: true };
    let mut scenarios = vec![
        Scenario {
            name: "direct upstream GET",
            target: get(upstream_addr),
            pids: upstream.pids(),
            latency: true,
            on_core0: false,
            runs: vec![],
            lat: vec![],
        },
        Scenario {
            name: "nginx GET (pass-through)",
            target: get(nginx_addr),
            pids: proxy_nginx.pids(),
            latency: true,
            on_core0: true,
            runs: vec![],
            lat: vec![],
        },
        Scenario {
            name: "send-gateway GET (pass-through)",
            target: get(gateway_addr),
            pids: vec![gateway.pid()],
            latency: true,
            on_core0: true,
            runs: vec![],
            lat: vec![],
        },
        Scenario {
            name: "nginx POST send (proxied)",
            target: post(nginx_addr),
            pids: proxy_nginx.pids(),
            latency: false,
            on_core0: true,
            runs: vec![],
            lat: vec![],
        },
        Scenario {
            name: "send-gateway POST send (memory)",
            target: post(gateway_addr),
            pids: vec![gateway.pid()],
            latency: true,
            on_core0: true,
            runs: vec![],
            lat: vec![],
        },
    ];

    // Every scenario answers 200 with the upstream's body before anything is timed.
    for s in &scenarios {
        let (status, body) = rt.block_on(probe(&s.target));
        if status != 200 || !body.contains("\"request_id\":\"bench\"") {
            eprintln!(
                "proxy bench: {} answered {status}: {body}\n(nginx logs under {})",
                s.name,
                dir.path().display()
            );
            return ExitCode::FAILURE;
        }
    }

    let started = Instant::now();
    for round in 0..rounds {
        let n = scenarios.len();
        for j in 0..n {
            let s = &mut scenarios[(round + j) % n];
            let run = rt.block_on(closed_loop(&s.target, &s.pids, conns, secs));
            let pct = |t: u64| t as f64 * tick_us / (run.secs * 1e6) * 100.0;
            println!(
                "round {} closed {:<34} {:>8.0} req/s {:>7.1} us CPU/req  proxy {:>3.0}%  core0 {:>3.0}%  core1 {:>3.0}%  ({} ok, {} failed)",
                round + 1,
                s.name,
                run.ok as f64 / run.secs,
                run.cpu_ticks as f64 * tick_us / run.ok.max(1) as f64,
                pct(run.cpu_ticks),
                pct(run.core_ticks[0]),
                pct(run.core_ticks[1]),
                run.ok,
                run.failed
            );
            s.runs.push(run);
        }
        for j in 0..n {
            let s = &mut scenarios[(round + j) % n];
            if !s.latency {
                continue;
            }
            let lat = rt.block_on(open_loop(&s.target, &s.pids, rate, rate_secs));
            println!(
                "round {} open   {:<34} p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us  ({} ok, {} failed)",
                round + 1,
                s.name,
                lat.p50_us,
                lat.p99_us,
                lat.max_us,
                lat.n,
                lat.failed
            );
            s.lat.push(lat);
        }
    }
    let failed: u64 = scenarios
        .iter()
        .map(|s| {
            s.runs.iter().map(|r| r.failed).sum::<u64>()
                + s.lat.iter().map(|l| l.failed).sum::<u64>()
        })
        .sum();

    // Table: medians over rounds, each round's figure after it.
    println!(
        "\n== medians of {rounds} interleaved rounds ({:.0} s in all); per-round figures in brackets",
        started.elapsed().as_secs_f64()
    );
    println!(
        "| scenario | req/s (closed, {conns} conns) | proxy CPU us/req | proxy busy % of a core | core 0 busy with other work % | core 1 busy % | p50 us @ {rate}/s | p99 us @ {rate}/s | proxy CPU us/req @ {rate}/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for s in &scenarios {
        let p50: Vec<f64> = s.lat.iter().map(|l| l.p50_us).collect();
        let p99: Vec<f64> = s.lat.iter().map(|l| l.p99_us).collect();
        let lat_cpu: Vec<f64> = s
            .lat
            .iter()
            .map(|l| l.cpu_ticks as f64 * tick_us / l.n.max(1) as f64)
            .collect();
        let cell = |v: &[f64], d: usize| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.d$} [{}]", median(v.to_vec()), list(v, d))
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            cell(&s.rps(), 0),
            cell(&s.cpu_us(tick_us), 1),
            cell(&s.busy(tick_us), 0),
            cell(&s.core0_others(tick_us, s.on_core0), 0),
            cell(&s.core1(tick_us), 0),
            cell(&p50, 1),
            cell(&p99, 1),
            cell(&lat_cpu, 1),
        );
    }

    let rps = |i: usize| median(scenarios[i].rps());
    let cpu = |i: usize| median(scenarios[i].cpu_us(tick_us));
    let p = |i: usize, f: fn(&Latency) -> f64| median(scenarios[i].lat.iter().map(f).collect());
    let (direct, ngx, gw_get, ngx_send, gw_send) = (0, 1, 2, 3, 4);
    let pass_ratio = rps(gw_get) / rps(ngx);
    let send_ratio = rps(gw_send) / rps(gw_get);
    let added = |i: usize| {
        (
            p(i, |l| l.p50_us) - p(direct, |l| l.p50_us),
            p(i, |l| l.p99_us) - p(direct, |l| l.p99_us),
        )
    };
    let (ngx_a50, ngx_a99) = added(ngx);
    let (get_a50, get_a99) = added(gw_get);
    let (send_a50, send_a99) = added(gw_send);
    println!("\n== ratios (medians)");
    println!(
        "pass-through req/s, send-gateway / nginx:      {pass_ratio:.2}x  (goal >= 1.0x: {})",
        verdict(pass_ratio >= 1.0)
    );
    println!(
        "pass-through CPU/request, send-gateway / nginx: {:.2}x  ({:.1} us vs {:.1} us; goal <= 1.0x: {})",
        cpu(gw_get) / cpu(ngx),
        cpu(gw_get),
        cpu(ngx),
        verdict(cpu(gw_get) <= cpu(ngx))
    );
    println!(
        "JSON send / pass-through req/s, send-gateway:  {send_ratio:.2}x  (goal >= 0.8x: {})",
        verdict(send_ratio >= 0.8)
    );
    println!(
        "send CPU/request, send-gateway / nginx POST:    {:.2}x  ({:.1} us vs {:.1} us)",
        cpu(gw_send) / cpu(ngx_send),
        cpu(gw_send),
        cpu(ngx_send)
    );
    println!(
        "added latency @ {rate} req/s over direct (p50 / p99): nginx {ngx_a50:.0} / {ngx_a99:.0} us; send-gateway GET {get_a50:.0} / {get_a99:.0} us; send-gateway send {send_a50:.0} / {send_a99:.0} us  (goal p99 < 1000 us: GET {}, send {})",
        verdict(get_a99 < 1000.0),
        verdict(send_a99 < 1000.0)
    );
    let log_lines = std::fs::read_to_string(dir.path().join("gateway.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    println!("send-gateway wrote {log_lines} log lines to stderr (a file)");
    println!("load average at the end: {}", loadavg());

    drop(gateway);
    drop(proxy_nginx);
    drop(upstream);
    if failed > 0 {
        eprintln!("proxy bench: {failed} requests failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
