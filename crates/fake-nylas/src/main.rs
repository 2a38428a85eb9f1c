//! `fake-nylas`: serve a fake Nylas v3 API until Ctrl-C or SIGTERM.
//!
//! Prints `fake-nylas listening on http://ADDR` on stdout once ready (first line),
//! then the demo grant; logs go to stderr (`RUST_LOG`, default `info`).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use fake_nylas::{DEMO_GRANT_EMAIL, DEMO_GRANT_EXTERNAL_ID, DEMO_GRANT_ID, FakeNylas};

/// A fake Nylas v3 API for tests, benchmarks and local trials.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on; port 0 picks a free one (read it from the ready line).
    #[arg(long, default_value = "127.0.0.1:4000", env = "FAKE_NYLAS_LISTEN")]
    listen: SocketAddr,
    /// Accept only this bearer token (plus registered access tokens); any by default.
    #[arg(long, env = "FAKE_NYLAS_API_KEY")]
    api_key: Option<String>,
    /// Record only body lengths, not bodies (for load benchmarks).
    #[arg(long)]
    no_record_bodies: bool,
    /// Keep only the newest N recorded requests.
    #[arg(long)]
    record_limit: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let fake = FakeNylas::start(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    fake.set_api_key(args.api_key);
    fake.set_record_bodies(!args.no_record_bodies);
    fake.set_record_limit(args.record_limit);

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "fake-nylas listening on {}", fake.url())?;
    writeln!(
        stdout,
        "demo grant: id={DEMO_GRANT_ID} email={DEMO_GRANT_EMAIL} external={DEMO_GRANT_EXTERNAL_ID}"
    )?;
    stdout.flush()?;
    drop(stdout);

    shutdown_signal().await;
    tracing::info!("shutting down");
    fake.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
