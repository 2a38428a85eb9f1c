//! `send-gateway`: parse the command line, load the configuration, start tracing, serve
//! (or run one of the operator's subcommands, in `cli.rs`).

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use gateway::config::{Config, ConfigError, LogConfig, LogFormat, Sources};
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = Sources::from_process(cli.config.clone(), cli.overrides.to_pairs());
    match cli.command {
        Some(Command::Quota(command)) => cli::quota(command, || sources.load()),
        Some(Command::CheckConfig) => match sources.load() {
            Ok(config) => {
                print!("{}", config.to_masked_toml());
                for warning in config.warnings() {
                    eprintln!("send-gateway: warning: {warning}");
                }
                println!("# send-gateway: configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        None => match sources.load() {
            Ok(config) => serve(config, sources),
            Err(e) => config_error(&e),
        },
    }
}

/// One line naming the key, exit 64.
fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("send-gateway: config error: {e}");
    ExitCode::from(ConfigError::EXIT_CODE as u8)
}

fn serve(config: Config, sources: Sources) -> ExitCode {
    // Held until the process ends: dropping it flushes the lines still queued.
    let _log_writer = init_tracing(&config.log);
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
    // SIGHUP loads the same sources again: the file as it is now, the same environment and
    // flags.
    match runtime.block_on(gateway::serve(config, move || sources.load())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "send-gateway stopped");
            eprintln!("send-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout carries the ready lines), coloured only on a terminal, as text
/// or JSON per `[log] format`; `RUST_LOG`, when set, replaces `[log] level`.
///
/// Lines are written by a background thread (`tracing-appender`), so no request waits on
/// a write to stderr. It is not lossy: should the queue ever fill, logging waits rather than
/// dropping a decision line. The returned guard flushes the queue when dropped.
fn init_tracing(log: &LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("send-gateway-log")
        .finish(std::io::stderr());
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .unwrap_or_else(|e| {
                eprintln!("send-gateway: ignoring RUST_LOG ({e}); using [log] level");
                EnvFilter::new(&log.level)
            }),
        // Validated when the configuration was loaded.
        _ => EnvFilter::new(&log.level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match log.format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    if let Err(e) = installed {
        eprintln!("send-gateway: cannot start logging: {e}");
    }
    guard
}
