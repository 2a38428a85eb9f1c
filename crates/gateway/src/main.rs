//! `send-gateway`: parse the command line, load the configuration, start tracing, serve.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gateway::config::{Config, ConfigError};

/// A quota-enforcing proxy in front of the Nylas v3 API.
#[derive(Debug, Parser)]
#[command(name = "send-gateway", version, about)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, short, global = true, env = "SEND_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and exit (64 and one line naming the key when it is bad).
    CheckConfig,
}

fn load(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(cli.config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("send-gateway: config error: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE as u8);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        println!(
            "send-gateway: configuration is valid (listen {}, admin {}, store {:?}, default profile {})",
            config.server.listen,
            config.server.admin_listen,
            config.store.backend,
            config.grants.default_profile
        );
        return ExitCode::SUCCESS;
    }
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("send-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "send-gateway stopped");
            eprintln!("send-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    let admin = tokio::net::TcpListener::bind(config.server.admin_listen).await?;
    // Tests and scripts read these lines to learn the ports when binding port 0.
    println!(
        "send-gateway listening on http://{}",
        listener.local_addr()?
    );
    println!("send-gateway admin on http://{}", admin.local_addr()?);
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        upstream = %config.upstream.url,
        store = ?config.store.backend,
        "send-gateway started"
    );
    let state = Arc::new(gateway::AppState::new(config).await?);
    gateway::run(listener, admin, state, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
