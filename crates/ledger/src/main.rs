//! `credits-ledger`: serve the ledger, or check its journal.

// A panic in a request handler must become a 500 answer, not the end of the process: that needs
// unwinding. The workspace's release profile unwinds; only the Wasm filter aborts (its target
// default, made explicit in .cargo/config.toml).
#[cfg(panic = "abort")]
compile_error!("credits-ledger must be built with panic = \"unwind\" so that a handler panic answers 500");

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ledger::api::auth::{Auth, TokenError};

/// glibc's malloc and free were a quarter of the ledger's CPU serving gateway syncs
/// (bench/RESULTS.md §0za).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Admin bearer token(s): every endpoint. Comma-separated to accept several (rotation).
        #[arg(long, env = "CREDITS_LEDGER_TOKEN", hide_env_values = true, value_delimiter = ',')]
        token: Vec<String>,
        /// Gateway bearer token(s): customer look-ups, balances, usage and leases only.
        /// Comma-separated to accept several (rotation).
        #[arg(long, env = "CREDITS_LEDGER_GATEWAY_TOKEN", hide_env_values = true, value_delimiter = ',')]
        gateway_token: Vec<String>,
        /// Serve without authentication (local experiments only; refused with any token).
        #[arg(long)]
        insecure_no_auth: bool,
        /// How often the background job books expiries that fell due.
        #[arg(long, env = "CREDITS_LEDGER_EXPIRY_INTERVAL_MS", default_value_t = 1000,
              value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
        expiry_interval_ms: u64,
        /// The largest request body read; larger ones are refused with 413.
        #[arg(long, env = "CREDITS_LEDGER_MAX_BODY_BYTES", default_value_t = ledger::api::request::DEFAULT_MAX_BODY_BYTES)]
        max_body_bytes: usize,
        /// The first retry of a failed webhook delivery waits this long; each further one twice as long.
        #[arg(long, env = "CREDITS_LEDGER_WEBHOOK_RETRY_MS", default_value_t = 5000,
              value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
        webhook_retry_ms: u64,
        /// The longest wait between two attempts of one delivery.
        #[arg(long, env = "CREDITS_LEDGER_WEBHOOK_MAX_RETRY_MS", default_value_t = 3_600_000,
              value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
        webhook_max_retry_ms: u64,
        /// Attempts per webhook delivery (the first included); then it is marked failed.
        #[arg(long, env = "CREDITS_LEDGER_WEBHOOK_MAX_ATTEMPTS", default_value_t = 10,
              value_parser = clap::value_parser!(u32).range(1..=100))]
        webhook_max_attempts: u32,
        /// How long one delivery attempt may take.
        #[arg(long, env = "CREDITS_LEDGER_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000,
              value_parser = clap::value_parser!(u64).range(100..=300_000))]
        webhook_timeout_ms: u64,
        /// How long one group of gateway syncs that waited together may take to serve: under load
        /// the ledger serves as many as fit in it (more per second than in small groups, and each
        /// answered sooner), while every other write waits on SQLite, and writes to the group's
        /// customers on PostgreSQL.
        #[arg(long, env = "CREDITS_LEDGER_SYNC_GROUP_MS", default_value_t = ledger::api::gateway::DEFAULT_GROUP_MS,
              value_parser = clap::value_parser!(u64).range(10..=60_000))]
        sync_group_ms: u64,
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
        Command::Serve {
            listen,
            database,
            token,
            gateway_token,
            insecure_no_auth,
            expiry_interval_ms,
            max_body_bytes,
            webhook_retry_ms,
            webhook_max_retry_ms,
            webhook_max_attempts,
            webhook_timeout_ms,
            sync_group_ms,
        } => {
            if max_body_bytes < credits::limits::MIN_MAX_BODY_BYTES {
                anyhow::bail!("--max-body-bytes must be at least {}", credits::limits::MIN_MAX_BODY_BYTES);
            }
            if webhook_max_retry_ms < webhook_retry_ms {
                anyhow::bail!("--webhook-max-retry-ms must be at least --webhook-retry-ms");
            }
            let auth = if insecure_no_auth {
                if !(token.is_empty() && gateway_token.is_empty()) {
                    anyhow::bail!("--insecure-no-auth serves without tokens: give it, or tokens, not both");
                }
                tracing::warn!("serving WITHOUT authentication (--insecure-no-auth)");
                Auth::Open
            } else {
                Auth::tokens(&token, &gateway_token).map_err(|e| match e {
                    TokenError::NoAdminToken => anyhow::anyhow!("{e} (or --insecure-no-auth for local experiments)"),
                    e => anyhow::anyhow!("{e}"),
                })?
            };
            let mut state = ledger::state(&database, auth).await?;
            state.max_body_bytes = max_body_bytes;
            state.syncs = Arc::new(ledger::api::gateway::SyncQueue::new(Duration::from_millis(sync_group_ms)));
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(listen = %listener.local_addr()?, database = %ledger::db::redact(&database), "credits-ledger serving");
            let webhooks = ledger::notify::delivery::WebhookConfig {
                retry_ms: webhook_retry_ms,
                max_retry_ms: webhook_max_retry_ms,
                max_attempts: webhook_max_attempts,
                timeout_ms: webhook_timeout_ms,
            };
            let jobs = ledger::Jobs { expiry_interval: Duration::from_millis(expiry_interval_ms), webhooks };
            ledger::serve_with(listener, state, jobs).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { database } => {
            // A check reads a journal that exists: an SQLite file that is not there (a typo,
            // another directory) is an error, never a new empty journal reported sound.
            let database = if database.starts_with("sqlite:") && !database.contains('?') {
                format!("{database}?mode=rw")
            } else {
                database
            };
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
