//! What each subcommand does, kept out of `main.rs` so it can be tested and reused.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// Sets up `tracing` to stderr. `RUST_LOG` overrides the default level (`info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `taler-paywall check`: prints every problem, one per line, and returns 1 if there are any.
pub fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!(
                "{}: OK ({} protected prefix{})",
                path.display(),
                config.protect.len(),
                if config.protect.len() == 1 { "" } else { "es" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// `taler-paywall serve`.
///
/// # Errors
/// Configuration or startup failures (bad file, port in use).
pub fn serve(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    runtime()?.block_on(crate::gateway::serve(config, Some(path.to_owned())))
}

/// `taler-paywall demo`.
///
/// # Errors
/// Startup failures.
pub fn demo(port: u16) -> anyhow::Result<()> {
    runtime()?.block_on(crate::demo::run(port))
}

/// `taler-paywall sandbox-merchant`.
///
/// # Errors
/// Startup failures (bad arguments, port in use).
pub fn sandbox_merchant(
    listen: SocketAddr,
    token: String,
    public_url: Option<String>,
    faults: Option<String>,
) -> anyhow::Result<()> {
    runtime()?.block_on(crate::sandbox::run_cli(listen, token, public_url, faults))
}
