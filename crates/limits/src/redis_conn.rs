//! How the Redis store reaches Redis: the URL of each topology, TLS, and one connection
//! type over all three.
//!
//! - `redis://` and `rediss://`: one server (a `ConnectionManager`, which reconnects).
//! - `redis+cluster://` and `rediss+cluster://`: seed nodes of a Redis Cluster. The URL's
//!   credentials and TLS settings apply to every seed and every node discovered.
//! - `redis+sentinel://` and `rediss+sentinel://`: sentinels and a master name. The
//!   primary is asked of the sentinels, checked with `ROLE`, asked again after any outage
//!   or `READONLY` answer, and compared with the sentinels' answer on every health check,
//!   so a failover is followed without a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use percent_encoding::percent_decode_str;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};

use crate::redis::{RedisConfig, RedisTls};
use crate::store::StoreError;

/// Which kind of deployment a store URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server: `redis://` or `rediss://`.
    Single,
    /// Redis Cluster: `redis+cluster://` or `rediss+cluster://`.
    Cluster,
    /// A Sentinel-managed primary: `redis+sentinel://` or `rediss+sentinel://`.
    Sentinel,
}

/// A store URL taken apart.
struct Parsed {
    topology: Topology,
    tls: bool,
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<(String, u16)>,
    /// Sentinel only: the master's name and the database.
    master: String,
    db: i64,
}

/// Checks a store URL without connecting: its scheme, hosts, ports and (for Sentinel) the
/// master name and database. Returns the topology it names.
///
/// # Errors
/// [`StoreError::Invalid`] naming what is wrong; the URL's password is never in it.
pub fn check_url(url: &str) -> Result<Topology, StoreError> {
    parse(url).map(|p| p.topology)
}

fn invalid(what: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("store url: {what}"))
}

fn parse(url: &str) -> Result<Parsed, StoreError> {
    const SCHEMES: &str = "redis://, rediss://, redis+cluster://, rediss+cluster://, \
        redis+sentinel:// or rediss+sentinel://";
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid(format!("no scheme (use {SCHEMES})")))?;
    let (topology, tls) = match scheme {
        "redis" => (Topology::Single, false),
        "rediss" => (Topology::Single, true),
        "redis+cluster" => (Topology::Cluster, false),
        "rediss+cluster" => (Topology::Cluster, true),
        "redis+sentinel" => (Topology::Sentinel, false),
        "rediss+sentinel" => (Topology::Sentinel, true),
        _ => return Err(invalid(format!("unknown scheme (use {SCHEMES})"))),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = credentials(userinfo)?;
    let hosts = hosts_of(hosts, topology)?;
    let (master, db) = match topology {
        Topology::Sentinel => sentinel_path(path)?,
        _ => (String::new(), 0),
    };
    Ok(Parsed {
        topology,
        tls,
        username,
        password,
        hosts,
        master,
        db,
    })
}

/// `user:pass`, `:pass` or `user`, percent-decoded.
fn credentials(userinfo: Option<&str>) -> Result<(Option<String>, Option<String>), StoreError> {
    let Some(info) = userinfo else {
        return Ok((None, None));
    };
    let decode = |s: &str| -> Result<Option<String>, StoreError> {
        let s = percent_decode_str(s)
            .decode_utf8()
            .map_err(|_| invalid("credentials are not UTF-8 once percent-decoded"))?;
        Ok(Some(s.into_owned()).filter(|s| !s.is_empty()))
    };
    match info.split_once(':') {
        Some((user, pass)) => Ok((decode(user)?, decode(pass)?)),
        None => Ok((decode(info)?, None)),
    }
}

fn hosts_of(list: &str, topology: Topology) -> Result<Vec<(String, u16)>, StoreError> {
    let default_port = if topology == Topology::Sentinel {
        26379
    } else {
        6379
    };
    let hosts = list
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| host_port(h, default_port))
        .collect::<Result<Vec<_>, _>>()?;
    if hosts.is_empty() {
        return Err(invalid("no host"));
    }
    if topology == Topology::Single && hosts.len() > 1 {
        return Err(invalid(
            "several hosts need redis+cluster:// or redis+sentinel://",
        ));
    }
    Ok(hosts)
}

fn host_port(h: &str, default_port: u16) -> Result<(String, u16), StoreError> {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !h.ends_with(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| invalid(format!("bad port in {h:?}")))?;
            (host, port)
        }
        _ => (h, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(invalid(format!("bad host {h:?}")));
    }
    Ok((host.to_owned(), port))
}

/// `<master-name>[/<db>]`.
fn sentinel_path(path: &str) -> Result<(String, i64), StoreError> {
    let mut parts = path.trim_end_matches('/').splitn(2, '/');
    let master = parts.next().unwrap_or_default();
    if master.is_empty() {
        return Err(invalid(
            "a Sentinel url ends with the master's name: redis+sentinel://host:port/<master>",
        ));
    }
    let db = match parts.next() {
        Some(db) => db
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| invalid(format!("bad database {db:?}")))?,
        None => 0,
    };
    Ok((master.to_owned(), db))
}

/// Makes ring the process's rustls provider unless one is already installed.
fn install_tls_provider() {
    // An error only says that a provider is installed already, which is what is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certificates(tls: &RedisTls) -> TlsCertificates {
    TlsCertificates {
        client_tls: tls.client_pem.clone().map(|(client_cert, client_key)| {
            redis::ClientTlsConfig {
                client_cert,
                client_key,
            }
        }),
        root_cert: tls.ca_pem.clone(),
    }
}

fn tls_mode(tls: &RedisTls) -> TlsMode {
    if tls.insecure_skip_verify {
        TlsMode::Insecure
    } else {
        TlsMode::Secure
    }
}

/// How to open the connection.
pub(crate) enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
    Sentinel(SentinelConn),
}

impl Client {
    /// Builds the client for `config`'s URL, without connecting.
    pub(crate) fn new(config: &RedisConfig) -> Result<Client, StoreError> {
        let parsed = parse(&config.url)?;
        if config.tls.is_set() && !parsed.tls {
            return Err(StoreError::Invalid(
                "TLS settings need a rediss://, rediss+cluster:// or rediss+sentinel:// url".into(),
            ));
        }
        if parsed.tls {
            install_tls_provider();
        }
        match parsed.topology {
            Topology::Single => single(config).map(|c| Client::Single(Box::new(c))),
            Topology::Cluster => cluster(config, &parsed).map(|c| Client::Cluster(Box::new(c))),
            Topology::Sentinel => SentinelConn::new(config, &parsed).map(Client::Sentinel),
        }
    }

    pub(crate) fn topology(&self) -> Topology {
        match self {
            Client::Single(_) => Topology::Single,
            Client::Cluster(_) => Topology::Cluster,
            Client::Sentinel(_) => Topology::Sentinel,
        }
    }

    /// Opens the connection (for Sentinel, asks for the primary on first use).
    pub(crate) async fn connect(&self, timeout: Duration) -> RedisResult<Conn> {
        match self {
            Client::Cluster(c) => c.get_async_connection().await.map(Conn::Cluster),
            Client::Single(c) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2);
                let client = redis::Client::clone(c);
                ConnectionManager::new_with_config(client, cfg)
                    .await
                    .map(Conn::Single)
            }
            Client::Sentinel(s) => {
                s.current().await?;
                Ok(Conn::Sentinel(s.clone()))
            }
        }
    }
}

fn single(config: &RedisConfig) -> Result<redis::Client, StoreError> {
    let bad = |e: RedisError| invalid(e);
    let tls = &config.tls;
    if !tls.is_set() {
        return redis::Client::open(config.url.as_str()).map_err(bad);
    }
    let url = if tls.insecure_skip_verify {
        format!("{}#insecure", config.url.trim_end_matches("#insecure"))
    } else {
        config.url.clone()
    };
    redis::Client::build_with_tls(url.as_str(), certificates(tls)).map_err(bad)
}

fn cluster(config: &RedisConfig, p: &Parsed) -> Result<redis::cluster::ClusterClient, StoreError> {
    let scheme = if p.tls { "rediss" } else { "redis" };
    let seeds: Vec<String> = p
        .hosts
        .iter()
        .map(|(h, port)| format!("{scheme}://{h}:{port}"))
        .collect();
    let mut b = redis::cluster::ClusterClient::builder(seeds)
        .connection_timeout(config.timeout)
        .response_timeout(config.timeout);
    if let Some(user) = &p.username {
        b = b.username(user);
    }
    if let Some(pass) = &p.password {
        b = b.password(pass);
    }
    if p.tls {
        b = b
            .tls(tls_mode(&config.tls))
            .certs(certificates(&config.tls));
    }
    b.build().map_err(invalid)
}

/// The primary of a Sentinel-managed set, found again after an outage or a failover.
#[derive(Clone)]
pub(crate) struct SentinelConn(Arc<SentinelLink>);

struct SentinelLink {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The primary's address and a connection to it; `None` until asked again.
    current: Mutex<Option<(ConnectionAddr, MultiplexedConnection)>>,
    config: AsyncConnectionConfig,
}

impl SentinelConn {
    fn new(config: &RedisConfig, p: &Parsed) -> Result<SentinelConn, StoreError> {
        let addrs = p.hosts.iter().map(|(host, port)| match p.tls {
            true => ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: config.tls.insecure_skip_verify,
                tls_params: None,
            },
            false => ConnectionAddr::Tcp(host.clone(), *port),
        });
        let mut b = SentinelClientBuilder::new(addrs, &p.master, SentinelServerType::Master)
            .map_err(invalid)?
            .set_client_to_redis_db(p.db);
        if let Some(user) = &p.username {
            b = b.set_client_to_redis_username(user);
        }
        if let Some(pass) = &p.password {
            b = b.set_client_to_redis_password(pass);
        }
        if let Some(user) = &config.sentinel_username {
            b = b.set_client_to_sentinel_username(user);
        }
        if let Some(pass) = &config.sentinel_password {
            b = b.set_client_to_sentinel_password(pass);
        }
        if p.tls {
            let (mode, certs) = (tls_mode(&config.tls), certificates(&config.tls));
            b = b
                .set_client_to_redis_tls_mode(mode)
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_tls_mode(mode)
                .set_client_to_sentinel_certificates(certs);
        }
        let config_async = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout));
        Ok(SentinelConn(Arc::new(SentinelLink {
            client: tokio::sync::Mutex::new(b.build().map_err(invalid)?),
            current: Mutex::new(None),
            config: config_async,
        })))
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        lock(&self.0.current).as_ref().map(|(_, c)| c.clone())
    }

    /// The connection to the primary, asking the sentinels if there is none.
    async fn current(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let mut sentinel = self.0.client.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let client = sentinel.async_get_client().await?;
        let addr = client.get_connection_info().addr().clone();
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.0.config)
            .await?;
        *lock(&self.0.current) = Some((addr, conn.clone()));
        Ok(conn)
    }

    /// Asks the sentinels which node is the primary now and moves to it if it moved. Run by
    /// every health check, so a failover is followed within a check's interval even when
    /// the old primary still answers.
    pub(crate) async fn follow(&self) -> RedisResult<()> {
        let mut sentinel = self.0.client.lock().await;
        let client = sentinel.async_get_client().await?;
        let addr = client.get_connection_info().addr().clone();
        let same = lock(&self.0.current)
            .as_ref()
            .is_some_and(|(a, _)| *a == addr);
        if !same {
            let conn = client
                .get_multiplexed_async_connection_with_config(&self.0.config)
                .await?;
            *lock(&self.0.current) = Some((addr, conn));
        }
        Ok(())
    }

    /// Drops the connection after an answer that says the primary may have moved.
    fn forget_after(&self, e: &RedisError) {
        let moved = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
        if moved {
            *lock(&self.0.current) = None;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One multiplexed connection that reconnects by itself.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConn),
    /// The Sentinel primary of the moment, kept for one store call.
    Pinned(SentinelConn, MultiplexedConnection),
}

impl Conn {
    /// This connection, with a Sentinel primary fixed for the commands of one call.
    pub(crate) async fn pinned(&self) -> RedisResult<Conn> {
        match self {
            Conn::Sentinel(s) => Ok(Conn::Pinned(s.clone(), s.current().await?)),
            other => Ok(other.clone()),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut conn = s.current().await?;
                let reply = conn.req_packed_command(cmd).await;
                if let Err(e) = &reply {
                    s.forget_after(e);
                }
                reply
            }),
            Conn::Pinned(s, conn) => Box::pin(async move {
                let reply = conn.req_packed_command(cmd).await;
                if let Err(e) = &reply {
                    s.forget_after(e);
                }
                reply
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut conn = s.current().await?;
                let reply = conn.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &reply {
                    s.forget_after(e);
                }
                reply
            }),
            Conn::Pinned(s, conn) => Box::pin(async move {
                let reply = conn.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &reply {
                    s.forget_after(e);
                }
                reply
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(s) => s.cached().map_or(0, |c| c.get_db()),
            Conn::Pinned(_, c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_topology() {
        let cases = [
            ("redis://h:1", Topology::Single),
            ("rediss://u:p@h:6380/2", Topology::Single),
            ("redis+cluster://a:1,b:2", Topology::Cluster),
            ("rediss+cluster://:p@a:1,b:2", Topology::Cluster),
            ("redis+sentinel://a:1,b:2/mymaster", Topology::Sentinel),
            ("rediss+sentinel://u:p@a,b:2/mymaster/3", Topology::Sentinel),
        ];
        for (url, topology) in cases {
            assert_eq!(check_url(url).unwrap(), topology, "{url}");
        }
    }

    #[test]
    fn credentials_are_decoded_and_sentinel_ports_default() {
        let p = parse("redis+sentinel://us%40r:p%3Ass@a,b:7/m/2").unwrap();
        assert_eq!(p.username.as_deref(), Some("us@r"));
        assert_eq!(p.password.as_deref(), Some("p:ss"));
        assert_eq!(p.hosts, [("a".into(), 26379), ("b".into(), 7)]);
        assert_eq!((p.master.as_str(), p.db), ("m", 2));
        let p = parse("redis+cluster://:secret@x:1,y:2").unwrap();
        assert_eq!((p.username, p.password.as_deref()), (None, Some("secret")));
    }

    #[test]
    fn bad_urls_are_refused_without_the_password() {
        for url in [
            "http://h:1",
            "h:1",
            "redis+sentinel://a:1",
            "redis+sentinel://a:1/",
            "redis+sentinel://a:1/m/x",
            "redis+cluster://",
            "redis+cluster://:hunter2@a:notaport",
            "redis://a:1,b:2",
        ] {
            let e = check_url(url).unwrap_err().to_string();
            assert!(e.contains("store url"), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }
}
