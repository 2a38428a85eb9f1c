//! Multi-process Redis topologies for tests: a [`RedisCluster`] and a [`RedisSentinelSet`].
//!
//! Both start real `redis-server` processes on free loopback ports (never Docker), each in
//! its own temporary directory, and kill every process and remove every directory when
//! dropped. Each fixture is private to the test that made it, so tests may run them in
//! parallel. Commands go through `redis-cli` (with `-e`, so an error reply is an `Err`),
//! with the fixture's password and TLS flags filled in.
//!
//! Every wait is a bounded poll: a fixture that does not reach the state it waits for
//! panics with what it was waiting for and the tail of each process's log, never returns
//! half-built.
//!
//! # [`RedisCluster`]
//! Three masters, no replicas, slots `0-5460`, `5461-10922`, `10923-16383` (node 0, 1, 2),
//! built with `CLUSTER SET-CONFIG-EPOCH`, `CLUSTER ADDSLOTSRANGE` and `CLUSTER MEET`, then
//! waited on until every node reports `cluster_state:ok`, all 16384 slots ok and 3 known,
//! connected nodes. Optionally with a password (`requirepass` and `masterauth`, the same on
//! every node) and TLS ([`RedisCluster::start_tls`]: TLS only, `--port 0`, `--tls-cluster
//! yes`, client certificates optional, certificates from [`TestCerts`]).
//!
//! - The cluster bus port is a second free port (`cluster-port`), not `port + 10000`, which
//!   can overflow for ports from the ephemeral range.
//! - `cluster-node-timeout` is 2000 ms, so a node that stops is marked failing and a node
//!   that restarts is accepted again within a few seconds.
//! - `cluster-require-full-coverage no`: while a node is stopped, the others keep serving
//!   their own slots (and report `cluster_state:ok`); only keys of the stopped node fail.
//!   A test of "one shard down" sees partial availability, as in production setups that
//!   choose it.
//! - Each node keeps `nodes.conf` and an AOF (`appendonly yes`, `appendfsync always`) in its
//!   own directory, so [`RedisCluster::stop_node`] (SIGKILL, a crash) and
//!   [`RedisCluster::start_node`] (same port, same directory) bring the node back with its
//!   identity, its slots and every acknowledged write.
//!
//! # [`RedisSentinelSet`]
//! One master, one replica and three sentinels (quorum 2) monitoring it under a master name
//! (`mymaster` in most tests). The data nodes may have a password (`requirepass`,
//! `masterauth`, `sentinel auth-pass`), and the sentinels a separate one (`requirepass` on
//! the sentinels, `sentinel sentinel-pass` so they reach each other). Sentinels use
//! `down-after-milliseconds 1000`, `failover-timeout 3000`, `resolve-hostnames no` and
//! announce `127.0.0.1`. [`RedisSentinelSet::start`] returns only when every sentinel knows
//! the master, the replica and the two other sentinels, and the replica's link to the
//! master is up. [`RedisSentinelSet::failover`] asks for a failover and returns only once
//! the roles have really swapped (sentinels, `ROLE` of both nodes, replication link up);
//! this takes about ten seconds, because a sentinel demotes the old master only at its next
//! `INFO` poll, at least eight seconds after the failover. [`RedisSentinelSet::start_tls`]
//! runs every node TLS only (`port 0`, `tls-port`, `tls-replication yes`, which sentinels
//! also use to reach the data nodes; client certificates optional).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{MISSING_REDIS, TestCerts, free_port};

/// Slots per node, in node order.
const SLOT_RANGES: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];
/// How long a fixture waits for a state before it panics.
const SETTLE: Duration = Duration::from_secs(20);
/// How long a failover may take: the demotion of the old master alone takes ~10 s.
const FAILOVER: Duration = Duration::from_secs(30);
/// The longest one `redis-cli` call may run.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait polls.
const POLL: Duration = Duration::from_millis(50);

/// A fresh directory under the system temp dir, unique within this process and across
/// processes.
fn fresh_dir(kind: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "sendgw-{kind}-{}-{n}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    dir
}

/// How `redis-cli` reaches one process.
#[derive(Debug, Clone)]
struct Cli<'a> {
    port: u16,
    password: Option<&'a str>,
    certs: Option<&'a TestCerts>,
}

impl Cli<'_> {
    /// Runs `redis-cli` with `flags` and then `args`; stdout without its last newline.
    fn run(&self, flags: &[&str], args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-e", "-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(c) = self.certs {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(&c.ca)
                .arg("--cert")
                .arg(&c.client_cert)
                .arg("--key")
                .arg(&c.client_key);
        }
        if let Some(p) = self.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        cmd.args(flags)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = run_bounded(cmd, CLI_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stdout = stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(io::Error::other(format!(
                "redis-cli -p {} {args:?}: {} {}",
                self.port,
                stdout.trim(),
                stderr.trim()
            )))
        }
    }
}

/// Runs a command to completion, killing it after `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> io::Result<Output> {
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("redis-cli was not found on PATH: {MISSING_REDIS}")
        }
        Err(e) => return Err(e),
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("redis-cli ran longer than {limit:?}"),
            ))
        }
    }
}

/// One `redis-server` process: its arguments, its directory, its port.
#[derive(Debug)]
struct Node {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn log(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Starts the process and waits until it answers as itself (its `process_id`), so a
    /// port taken by someone else between [`free_port`] and the bind is an error, not a
    /// fixture talking to a stranger.
    fn spawn(&mut self, cli: &Cli<'_>) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!("{MISSING_REDIS}"),
            Err(e) => panic!("could not start redis-server: {e}"),
        };
        let want = format!("process_id:{}", child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited ({status}): {}",
                    self.port,
                    tail(&self.log())
                ));
            }
            if cli
                .run(&[], &["INFO", "server"])
                .is_ok_and(|r| r.lines().any(|l| l.trim() == want))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(format!(
            "redis-server on port {} did not answer within 10 s: {}",
            self.port,
            tail(&self.log())
        ))
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log file, for a panic message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(8);
    format!("[{}] {}", path.display(), lines[from..].join(" | "))
}

/// Polls `check` until it returns `Ok`, or panics after `limit` with its last `Err` and
/// `context()`.
fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<T, String>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!(
                    "timed out after {limit:?} waiting for {what}: {last}\n{}",
                    context()
                )
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// `INFO`-style `key:value` lines as a map.
fn info_map(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A `SENTINEL replicas`/`SENTINEL sentinels` reply, which `redis-cli` prints flattened
/// (one field name, then its value, line by line), as one map per entry.
fn sentinel_entries(text: &str) -> Vec<HashMap<String, String>> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut out: Vec<HashMap<String, String>> = Vec::new();
    for pair in lines.chunks(2) {
        if let [k, v] = pair {
            if *k == "name" {
                out.push(HashMap::new());
            }
            if let Some(e) = out.last_mut() {
                e.insert((*k).to_owned(), (*v).to_owned());
            }
        }
    }
    out
}

/// Whether a sentinel's entry looks healthy: no down or disconnected flag.
fn entry_healthy(e: &HashMap<String, String>) -> bool {
    let flags = e.get("flags").map(String::as_str).unwrap_or("");
    !flags
        .split(',')
        .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
}

/// Three Redis Cluster masters on loopback, with no replicas; see the [module docs](self).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    password: Option<String>,
    certs: Option<TestCerts>,
    root: PathBuf,
}

impl RedisCluster {
    /// Starts a plain-TCP cluster, optionally with a password, and waits until it is ok.
    ///
    /// # Panics
    /// When `redis-server` is missing or the cluster does not form within 20 s.
    pub fn start(password: Option<&str>) -> RedisCluster {
        Self::start_inner(password, false)
    }

    /// Like [`RedisCluster::start`], over TLS only (also the cluster bus); see
    /// [`RedisCluster::certs`].
    pub fn start_tls(password: Option<&str>) -> RedisCluster {
        Self::start_inner(password, true)
    }

    fn start_inner(password: Option<&str>, tls: bool) -> RedisCluster {
        let mut last = String::new();
        // A port taken between `free_port` and the bind: start over with fresh ports.
        for _ in 0..3 {
            match Self::try_start(password, tls) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("could not start a Redis Cluster: {last}");
    }

    fn try_start(password: Option<&str>, tls: bool) -> Result<RedisCluster, String> {
        let root = fresh_dir("cluster");
        let certs = tls.then(|| TestCerts::generate(&root.join("tls")));
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            password: password.map(str::to_owned),
            certs,
            root,
        };
        let mut bus_ports = Vec::new();
        for i in 0..SLOT_RANGES.len() {
            let port = free_port();
            let bus = free_port();
            let dir = cluster.root.join(format!("node{i}"));
            std::fs::create_dir_all(&dir).expect("create node dir");
            let args = cluster.node_args(port, bus, &dir);
            cluster.nodes.push(Node {
                port,
                dir,
                args,
                child: None,
            });
            bus_ports.push(bus);
        }
        let (password, certs) = (cluster.password.clone(), cluster.certs.clone());
        for node in &mut cluster.nodes {
            let cli = Cli {
                port: node.port,
                password: password.as_deref(),
                certs: certs.as_ref(),
            };
            node.spawn(&cli)?;
        }
        for (i, (from, to)) in SLOT_RANGES.iter().enumerate() {
            let epoch = (i + 1).to_string();
            cluster
                .command(i, &["CLUSTER", "SET-CONFIG-EPOCH", &epoch])
                .map_err(|e| e.to_string())?;
            cluster
                .command(
                    i,
                    &[
                        "CLUSTER",
                        "ADDSLOTSRANGE",
                        &from.to_string(),
                        &to.to_string(),
                    ],
                )
                .map_err(|e| e.to_string())?;
        }
        for (node, bus) in cluster.nodes.iter().zip(&bus_ports).skip(1) {
            let (port, bus) = (node.port.to_string(), bus.to_string());
            cluster
                .command(0, &["CLUSTER", "MEET", "127.0.0.1", &port, &bus])
                .map_err(|e| e.to_string())?;
        }
        cluster.wait_ok();
        Ok(cluster)
    }

    fn node_args(&self, port: u16, bus: u16, dir: &Path) -> Vec<String> {
        let d = |p: &Path| p.to_string_lossy().into_owned();
        let mut a: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--dir",
            &d(dir),
            "--logfile",
            &d(&dir.join("redis.log")),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &d(&dir.join("nodes.conf")),
            "--cluster-port",
            &bus.to_string(),
            "--cluster-node-timeout",
            "2000",
            "--cluster-require-full-coverage",
            "no",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(p) = &self.password {
            a.extend(["--requirepass", p, "--masterauth", p].map(str::to_owned));
        }
        match &self.certs {
            None => a.extend(["--port".to_owned(), port.to_string()]),
            Some(c) => a.extend([
                "--port".to_owned(),
                "0".to_owned(),
                "--tls-port".to_owned(),
                port.to_string(),
                "--tls-cert-file".to_owned(),
                d(&c.server_cert),
                "--tls-key-file".to_owned(),
                d(&c.server_key),
                "--tls-ca-cert-file".to_owned(),
                d(&c.ca),
                "--tls-auth-clients".to_owned(),
                "optional".to_owned(),
                "--tls-cluster".to_owned(),
                "yes".to_owned(),
                "--tls-replication".to_owned(),
                "yes".to_owned(),
            ]),
        }
        a
    }

    fn cli(&self, i: usize) -> Cli<'_> {
        Cli {
            port: self.nodes[i].port,
            password: self.password.as_deref(),
            certs: self.certs.as_ref(),
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| tail(&n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until every running node reports `cluster_state:ok`; when all three run, also
    /// until each sees all 16384 slots ok and the two others connected.
    fn wait_ok(&self) {
        let all = self.nodes.iter().all(Node::running);
        wait_until(
            "cluster_state:ok on every node",
            SETTLE,
            || {
                for (i, n) in self.nodes.iter().enumerate() {
                    if !n.running() {
                        continue;
                    }
                    let info = info_map(
                        &self
                            .command(i, &["CLUSTER", "INFO"])
                            .map_err(|e| e.to_string())?,
                    );
                    let get = |k: &str| info.get(k).map(String::as_str).unwrap_or("");
                    if get("cluster_state") != "ok" {
                        return Err(format!("node {i}: cluster_state:{}", get("cluster_state")));
                    }
                    if !all {
                        continue;
                    }
                    if get("cluster_slots_ok") != "16384" || get("cluster_known_nodes") != "3" {
                        return Err(format!("node {i}: {info:?}"));
                    }
                    let nodes = self
                        .command(i, &["CLUSTER", "NODES"])
                        .map_err(|e| e.to_string())?;
                    for line in nodes.lines() {
                        let f: Vec<&str> = line.split_whitespace().collect();
                        let flags = f.get(2).copied().unwrap_or("");
                        let bad = flags
                            .split(',')
                            .any(|x| matches!(x, "fail" | "fail?" | "handshake" | "noaddr"));
                        if bad || f.get(7) != Some(&"connected") {
                            return Err(format!("node {i} sees: {line}"));
                        }
                    }
                }
                Ok(())
            },
            || self.logs(),
        );
    }

    /// The nodes' client ports (the TLS ports of a TLS cluster), in node order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// One URL per node, `redis://[:pass@]127.0.0.1:<port>` (`rediss://` over TLS).
    pub fn seed_urls(&self) -> Vec<String> {
        let scheme = if self.certs.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://{auth}127.0.0.1:{}", n.port))
            .collect()
    }

    /// The password every node requires, if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The certificates of a [`RedisCluster::start_tls`] cluster: the server certificate is
    /// for `127.0.0.1` and `localhost`, signed by `ca`.
    pub fn certs(&self) -> Option<&TestCerts> {
        self.certs.as_ref()
    }

    /// Kills node `i` (SIGKILL, like a crash). Its slots stop answering; the other nodes
    /// keep serving theirs.
    ///
    /// # Panics
    /// When `i` is not a node.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts a stopped node `i` again, on the same port and from the same directory (its
    /// `nodes.conf` and AOF), and waits until the cluster is ok again on every running
    /// node (with all three running: every slot ok, every node connected). Does nothing
    /// to a node that runs.
    ///
    /// # Panics
    /// When the node does not come back within 20 s (or 10 s to answer at all).
    pub fn start_node(&mut self, i: usize) {
        if self.nodes[i].running() {
            return;
        }
        let port = self.nodes[i].port;
        let password = self.password.clone();
        let certs = self.certs.clone();
        let cli = Cli {
            port,
            password: password.as_deref(),
            certs: certs.as_ref(),
        };
        if let Err(e) = self.nodes[i].spawn(&cli) {
            panic!("could not restart cluster node {i}: {e}");
        }
        self.wait_ok();
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].running()
    }

    /// Runs one command on node `i` with `redis-cli` (password and TLS flags filled in).
    ///
    /// # Errors
    /// An error reply (`MOVED` included: this does not follow redirections), a node that
    /// does not answer, or `redis-cli` running over 10 s.
    pub fn command(&self, i: usize, args: &[&str]) -> io::Result<String> {
        self.cli(i).run(&[], args)
    }

    /// Runs one command with `redis-cli -c`, which follows `MOVED`/`ASK`, starting at the
    /// first running node.
    ///
    /// # Errors
    /// As [`RedisCluster::command`], and when no node runs.
    pub fn cluster_command(&self, args: &[&str]) -> io::Result<String> {
        let i = (0..self.nodes.len())
            .find(|&i| self.nodes[i].running())
            .ok_or_else(|| io::Error::other("no cluster node runs"))?;
        self.cli(i).run(&["-c"], args)
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a running node).
    ///
    /// # Panics
    /// When no node answers.
    pub fn slot_for_key(&self, key: &str) -> u16 {
        let r = self
            .any_node(&["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT");
        r.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT said {r:?}"))
    }

    /// The index of the node serving `slot`, from a running node's `CLUSTER NODES`.
    ///
    /// # Panics
    /// When no node answers or none claims the slot.
    pub fn node_for_slot(&self, slot: u16) -> usize {
        let text = self.any_node(&["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let owns = f.iter().skip(8).any(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            });
            if !owns {
                continue;
            }
            // `ip:port@cport[,hostname]`
            let port = f
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            if let Some(i) = port.and_then(|p| self.nodes.iter().position(|n| n.port == p)) {
                return i;
            }
        }
        panic!("no node claims slot {slot}: {text}");
    }

    /// The index of the node serving `key`.
    pub fn node_for_key(&self, key: &str) -> usize {
        self.node_for_slot(self.slot_for_key(key))
    }

    fn any_node(&self, args: &[&str]) -> io::Result<String> {
        let mut last = io::Error::other("no cluster node runs");
        for i in 0..self.nodes.len() {
            if self.nodes[i].running() {
                match self.command(i, args) {
                    Ok(r) => return Ok(r),
                    Err(e) => last = e,
                }
            }
        }
        Err(last)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A master, a replica and three sentinels on loopback; see the [module docs](self).
#[derive(Debug)]
pub struct RedisSentinelSet {
    master_name: String,
    data_password: Option<String>,
    sentinel_password: Option<String>,
    /// The first data node starts as master, the second as its replica.
    data: Vec<Node>,
    sentinels: Vec<Node>,
    certs: Option<TestCerts>,
    root: PathBuf,
}

impl RedisSentinelSet {
    /// Starts the data nodes, then the sentinels, and waits until every sentinel knows the
    /// master, the replica and both other sentinels, and the replica is in sync.
    ///
    /// # Panics
    /// When `redis-server` is missing or the set does not settle within 20 s.
    pub fn start(
        master: &str,
        data_password: Option<&str>,
        sentinel_password: Option<&str>,
    ) -> RedisSentinelSet {
        Self::start_inner(master, (data_password, sentinel_password), false)
    }

    /// Like [`RedisSentinelSet::start`], with every node (data and sentinels) over TLS
    /// only; see [`RedisSentinelSet::certs`].
    ///
    /// # Panics
    /// As [`RedisSentinelSet::start`].
    pub fn start_tls(
        master: &str,
        data_password: Option<&str>,
        sentinel_password: Option<&str>,
    ) -> RedisSentinelSet {
        Self::start_inner(master, (data_password, sentinel_password), true)
    }

    fn start_inner(
        master: &str,
        (data_password, sentinel_password): (Option<&str>, Option<&str>),
        tls: bool,
    ) -> RedisSentinelSet {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(master, data_password, sentinel_password, tls) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("could not start a Redis Sentinel set: {last}");
    }

    fn try_start(
        master: &str,
        data_password: Option<&str>,
        sentinel_password: Option<&str>,
        tls: bool,
    ) -> Result<RedisSentinelSet, String> {
        let root = fresh_dir("sentinel");
        let certs = tls.then(|| TestCerts::generate(&root.join("tls")));
        let mut set = RedisSentinelSet {
            master_name: master.to_owned(),
            data_password: data_password.map(str::to_owned),
            sentinel_password: sentinel_password.map(str::to_owned),
            data: Vec::new(),
            sentinels: Vec::new(),
            certs,
            root,
        };
        let master_port = free_port();
        set.data = data_nodes(&set.root, master_port, data_password, set.certs.as_ref());
        spawn_all(&mut set.data, data_password, set.certs.as_ref())?;
        // The replica in sync before the sentinels start: their first INFO of the master
        // then already lists it.
        let replica = set.data[1].port;
        wait_until(
            "the replica's master_link_status:up",
            SETTLE,
            || {
                let info = info_map(
                    &set.data_command(replica, &["INFO", "replication"])
                        .map_err(|e| e.to_string())?,
                );
                match info.get("master_link_status").map(String::as_str) {
                    Some("up") => Ok(()),
                    other => Err(format!("master_link_status {other:?}")),
                }
            },
            || set.logs(),
        );
        set.sentinels = sentinel_nodes(
            &set.root,
            (master, master_port),
            data_password,
            sentinel_password,
            set.certs.as_ref(),
        );
        spawn_all(&mut set.sentinels, sentinel_password, set.certs.as_ref())?;
        set.wait_sentinels_know(master_port, replica);
        Ok(set)
    }

    fn logs(&self) -> String {
        self.data
            .iter()
            .chain(&self.sentinels)
            .map(|n| tail(&n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until every sentinel names `master` as the master and knows `replica` and the
    /// two other sentinels, none of them down.
    fn wait_sentinels_know(&self, master: u16, replica: u16) {
        let name = self.master_name.as_str();
        wait_until(
            "every sentinel to know the master, the replica and the other sentinels",
            SETTLE,
            || {
                for i in 0..self.sentinels.len() {
                    let err = |e: io::Error| format!("sentinel {i}: {e}");
                    let at = self.master_port_from(i).map_err(err)?;
                    if at != master {
                        return Err(format!("sentinel {i} names master port {at}"));
                    }
                    let reps = sentinel_entries(
                        &self
                            .sentinel_command(i, &["SENTINEL", "REPLICAS", name])
                            .map_err(err)?,
                    );
                    let port = replica.to_string();
                    if !reps
                        .iter()
                        .any(|e| e.get("port") == Some(&port) && entry_healthy(e))
                    {
                        return Err(format!("sentinel {i} replicas: {reps:?}"));
                    }
                    let sents = sentinel_entries(
                        &self
                            .sentinel_command(i, &["SENTINEL", "SENTINELS", name])
                            .map_err(err)?,
                    );
                    if sents.len() != 2 || !sents.iter().all(entry_healthy) {
                        return Err(format!("sentinel {i} sentinels: {sents:?}"));
                    }
                }
                Ok(())
            },
            || self.logs(),
        );
    }

    /// The master name the sentinels monitor.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The data nodes' password, if any.
    pub fn data_password(&self) -> Option<&str> {
        self.data_password.as_deref()
    }

    /// The sentinels' own password, if any.
    pub fn sentinel_password(&self) -> Option<&str> {
        self.sentinel_password.as_deref()
    }

    /// The three sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|n| n.port).collect()
    }

    /// The two data nodes' ports: the first started as master, the second as replica.
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.iter().map(|n| n.port).collect()
    }

    /// The certificates of a [`RedisSentinelSet::start_tls`] set: the server certificate is
    /// for `127.0.0.1` and `localhost`, signed by `ca`.
    pub fn certs(&self) -> Option<&TestCerts> {
        self.certs.as_ref()
    }

    /// `redis+sentinel://[:pass@]127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/<master name>`
    /// (`rediss+sentinel://` over TLS), with the data nodes' password (not the sentinels')
    /// in the userinfo.
    pub fn url(&self) -> String {
        let auth = self
            .data_password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        let hosts = self
            .sentinels
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let scheme = match self.certs {
            Some(_) => "rediss+sentinel",
            None => "redis+sentinel",
        };
        format!("{scheme}://{auth}{hosts}/{}", self.master_name)
    }

    /// The master's port as sentinel 0 names it (`SENTINEL get-master-addr-by-name`).
    ///
    /// # Panics
    /// When the sentinel does not answer with an address.
    pub fn master_port(&self) -> u16 {
        self.master_port_from(0)
            .unwrap_or_else(|e| panic!("sentinel 0 named no master: {e}"))
    }

    fn master_port_from(&self, i: usize) -> io::Result<u16> {
        let r = self.sentinel_command(
            i,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name],
        )?;
        r.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("no master address in {r:?}")))
    }

    /// Forces a failover (`SENTINEL FAILOVER` on sentinel 0, retried while it answers
    /// `NOGOODSLAVE` or `INPROG`) and waits until every sentinel names the other data node,
    /// that node's `ROLE` is master, the old master's `ROLE` is a connected replica of it
    /// with its link up, and every sentinel sees the old master as a healthy replica.
    /// Returns the new master's port.
    ///
    /// # Panics
    /// When that does not happen within 30 s.
    pub fn failover(&self) -> u16 {
        let old = self.master_port();
        let new = self
            .data
            .iter()
            .map(|n| n.port)
            .find(|&p| p != old)
            .expect("two data nodes");
        let name = self.master_name.as_str();
        let start = Instant::now();
        wait_until(
            "SENTINEL FAILOVER to be accepted",
            FAILOVER,
            || {
                self.sentinel_command(0, &["SENTINEL", "FAILOVER", name])
                    .map_err(|e| e.to_string())
            },
            || self.logs(),
        );
        let left = FAILOVER.saturating_sub(start.elapsed());
        wait_until(
            &format!("the failover from port {old} to port {new}"),
            left,
            || {
                for i in 0..self.sentinels.len() {
                    let at = self.master_port_from(i).map_err(|e| e.to_string())?;
                    if at != new {
                        return Err(format!("sentinel {i} names master port {at}"));
                    }
                }
                let role = self
                    .data_command(new, &["ROLE"])
                    .map_err(|e| e.to_string())?;
                if role.lines().next() != Some("master") {
                    return Err(format!("port {new} ROLE: {role:?}"));
                }
                let role = self
                    .data_command(old, &["ROLE"])
                    .map_err(|e| e.to_string())?;
                let r: Vec<&str> = role.lines().map(str::trim).collect();
                let want_port = new.to_string();
                if r.first() != Some(&"slave")
                    || r.get(2) != Some(&want_port.as_str())
                    || r.get(3) != Some(&"connected")
                {
                    return Err(format!("port {old} ROLE: {r:?}"));
                }
                let info = info_map(
                    &self
                        .data_command(old, &["INFO", "replication"])
                        .map_err(|e| e.to_string())?,
                );
                if info.get("master_link_status").map(String::as_str) != Some("up") {
                    return Err(format!("port {old}: link not up"));
                }
                Ok(())
            },
            || self.logs(),
        );
        self.wait_sentinels_know(new, old);
        new
    }

    /// Runs one command on the data node listening on `port`, with the data password.
    ///
    /// # Errors
    /// An error reply, a node that does not answer, or `redis-cli` running over 10 s.
    pub fn data_command(&self, port: u16, args: &[&str]) -> io::Result<String> {
        Cli {
            port,
            password: self.data_password.as_deref(),
            certs: self.certs.as_ref(),
        }
        .run(&[], args)
    }

    /// Runs one command on sentinel `i`, with the sentinel password.
    ///
    /// # Errors
    /// As [`RedisSentinelSet::data_command`].
    pub fn sentinel_command(&self, i: usize, args: &[&str]) -> io::Result<String> {
        Cli {
            port: self.sentinels[i].port,
            password: self.sentinel_password.as_deref(),
            certs: self.certs.as_ref(),
        }
        .run(&[], args)
    }
}

impl Drop for RedisSentinelSet {
    fn drop(&mut self) {
        for n in self.sentinels.iter_mut().chain(self.data.iter_mut()) {
            n.stop();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A master on `master_port` and its replica, not started yet (TLS only with `certs`).
fn data_nodes(
    root: &Path,
    master_port: u16,
    password: Option<&str>,
    certs: Option<&TestCerts>,
) -> Vec<Node> {
    let d = path_text;
    [master_port, free_port()]
        .into_iter()
        .enumerate()
        .map(|(i, port)| {
            let dir = root.join(format!("data{i}"));
            std::fs::create_dir_all(&dir).expect("create data dir");
            let mut args: Vec<String> = [
                "--bind",
                "127.0.0.1",
                "--dir",
                &d(&dir),
                "--logfile",
                &d(&dir.join("redis.log")),
                "--save",
                "",
                "--appendonly",
                "no",
                "--replica-announce-ip",
                "127.0.0.1",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            if let Some(p) = password {
                args.extend(["--requirepass", p, "--masterauth", p].map(str::to_owned));
            }
            if i == 1 {
                args.extend(
                    ["--replicaof", "127.0.0.1", &master_port.to_string()].map(str::to_owned),
                );
            }
            for (key, value) in listen_directives(port, certs) {
                args.extend([format!("--{key}"), value]);
            }
            Node {
                port,
                dir,
                args,
                child: None,
            }
        })
        .collect()
}

/// Three sentinels watching `master` on `master_port`, not started yet (TLS only with
/// `certs`).
fn sentinel_nodes(
    root: &Path,
    (master, master_port): (&str, u16),
    data_password: Option<&str>,
    sentinel_password: Option<&str>,
    certs: Option<&TestCerts>,
) -> Vec<Node> {
    let d = path_text;
    (0..3)
        .map(|i| {
            let port = free_port();
            let dir = root.join(format!("sentinel{i}"));
            std::fs::create_dir_all(&dir).expect("create sentinel dir");
            let mut conf = format!(
                "bind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel resolve-hostnames no\nsentinel announce-ip 127.0.0.1\n\
                 sentinel monitor {master} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {master} 1000\n\
                 sentinel failover-timeout {master} 3000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir = d(&dir),
                log = d(&dir.join("redis.log")),
            );
            if let Some(p) = data_password {
                conf.push_str(&format!("sentinel auth-pass {master} {p}\n"));
            }
            if let Some(p) = sentinel_password {
                conf.push_str(&format!("requirepass {p}\nsentinel sentinel-pass {p}\n"));
            }
            for (key, value) in listen_directives(port, certs) {
                conf.push_str(&format!("{key} {value}\n"));
            }
            let file = dir.join("sentinel.conf");
            std::fs::write(&file, conf).expect("write sentinel.conf");
            Node {
                port,
                dir,
                args: vec![d(&file), "--sentinel".to_owned()],
                child: None,
            }
        })
        .collect()
}

/// Where a node listens: `port`, or with `certs` TLS only on it (`port 0`, `tls-port`),
/// replicating over TLS too (which sentinels also use to reach the data nodes).
fn listen_directives(port: u16, certs: Option<&TestCerts>) -> Vec<(&'static str, String)> {
    let Some(c) = certs else {
        return vec![("port", port.to_string())];
    };
    vec![
        ("port", "0".to_owned()),
        ("tls-port", port.to_string()),
        ("tls-cert-file", path_text(&c.server_cert)),
        ("tls-key-file", path_text(&c.server_key)),
        ("tls-ca-cert-file", path_text(&c.ca)),
        ("tls-auth-clients", "optional".to_owned()),
        ("tls-replication", "yes".to_owned()),
    ]
}

/// Starts every node of `nodes`, each answering with `password` (over TLS with `certs`).
fn spawn_all(
    nodes: &mut [Node],
    password: Option<&str>,
    certs: Option<&TestCerts>,
) -> Result<(), String> {
    for node in nodes {
        let cli = Cli {
            port: node.port,
            password,
            certs,
        };
        node.spawn(&cli)?;
    }
    Ok(())
}
