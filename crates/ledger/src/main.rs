//! `credits-ledger`: serve the ledger, or check its journal.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ledger::api::Auth;

#[derive(Parser)]
#[command(name = "credits-ledger", version, about = "The central prepaid-credit ledger")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        #[arg(long, env = "CREDITS_LEDGER_LISTEN", default_value = "127.0.0.1:8480")]
        listen: SocketAddr,
        /// sqlite://PATH (created on first start) or postgres://USER@HOST/DB.
        #[arg(long, env = "CREDITS_LEDGER_DATABASE", default_value = "sqlite://credits-ledger.db")]
        database: String,
        /// The bearer token clients must send.
        #[arg(long, env = "CREDITS_LEDGER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Serve without authentication (local experiments only).
        #[arg(long)]
        insecure_no_auth: bool,
        /// How often the background job books expiries that fell due.
        #[arg(long, env = "CREDITS_LEDGER_EXPIRY_INTERVAL_MS", default_value_t = 1000)]
        expiry_interval_ms: u64,
    },
    /// Verify the whole journal; exits non-zero with a report on any violation.
    Check {
        #[arg(long, env = "CREDITS_LEDGER_DATABASE", default_value = "sqlite://credits-ledger.db")]
        database: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("credits-ledger: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { listen, database, token, insecure_no_auth, expiry_interval_ms } => {
            let auth = match (token, insecure_no_auth) {
                (Some(t), _) if !t.is_empty() => Auth::Token(Arc::new(t)),
                (_, true) => {
                    tracing::warn!("serving WITHOUT authentication (--insecure-no-auth)");
                    Auth::Open
                }
                _ => anyhow::bail!(
                    "no token: pass --token or CREDITS_LEDGER_TOKEN (or --insecure-no-auth for local experiments)"
                ),
            };
            let state = ledger::state(&database, auth).await?;
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(listen = %listener.local_addr()?, database = %ledger::db::redact(&database), "credits-ledger serving");
            ledger::serve(listener, state, Duration::from_millis(expiry_interval_ms.max(10))).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { database } => {
            let db = ledger::db::Db::connect(&database).await?;
            let problems = ledger::check::run(&db).await?;
            if problems.is_empty() {
                println!("journal OK: postings balance, credit accounts match movements, grants within their amounts");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("journal check FAILED: {} violation(s)", problems.len());
                for p in &problems {
                    println!("  - {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
