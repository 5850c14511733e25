//! What each subcommand does, kept out of `main.rs` so it can be tested and reused.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with the span fields (the request id) included.
    Json,
}

/// Sets up `tracing` to stderr at the default level (`info`), as text.
pub fn init_logging() {
    init_logging_with(LogFormat::Text, "info");
}

/// Sets up `tracing` to stderr. `RUST_LOG`, when set, overrides `level`. ANSI colours are
/// used only when stderr is a terminal (never in files or journald).
pub fn init_logging_with(format: LogFormat, level: &str) {
    init_logging_to(format, level, std::io::stderr, false);
}

/// Returned by [`init_buffered_logging`]; kept for the life of `serve`.
#[must_use = "keep the guard until the process ends"]
#[derive(Debug)]
pub struct LogGuard(());

/// Like [`init_logging_with`], but the serving threads of `serve` write their lines in
/// batches ([`crate::logfmt::LineSink`]): nothing is dropped, a line reaches stderr within
/// [`crate::logfmt::BATCH_INTERVAL`], and every serving thread writes out the rest before it
/// ends. Other threads write each line at once.
pub fn init_buffered_logging(format: LogFormat, level: &str) -> LogGuard {
    init_logging_to(format, level, crate::logfmt::LineSink, true);
    LogGuard(())
}

/// `direct`: the writer is [`crate::logfmt::LineSink`], so request lines may bypass the
/// formatter ([`crate::logfmt::RequestLine`]) when it is the text one.
fn init_logging_to<W>(format: LogFormat, level: &str, writer: W, direct: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|e| {
            eprintln!("taler-paywall: invalid --log-level {level:?} ({e}); using info");
            tracing_subscriber::EnvFilter::new("info")
        });
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let _ = match format {
        // Colours on a terminal come from the default field formatter; files and journald
        // get the faster one that also escapes control characters (`logfmt`).
        LogFormat::Text if ansi => builder.try_init(),
        LogFormat::Text => {
            let installed = builder
                .fmt_fields(crate::logfmt::LineFields)
                .event_format(crate::logfmt::LineFormat::new())
                .try_init();
            if installed.is_ok() && direct {
                crate::logfmt::enable_direct_lines();
            }
            installed
        }
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// `taler-paywall healthcheck`: exit 0 when `url` answers 200 within `timeout`, else 1 with
/// a one-line reason on stderr.
pub fn healthcheck(url: &str, timeout: std::time::Duration) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(crate::admin::healthcheck(url, timeout)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taler-paywall healthcheck: {e:#}");
            ExitCode::from(1)
        }
    }
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

/// The environment variable that sets the number of runtime worker threads (default: one
/// per CPU core).
pub const WORKER_THREADS_ENV: &str = "TALER_PAYWALL_WORKER_THREADS";

/// The worker thread count asked for in [`WORKER_THREADS_ENV`], if any.
///
/// # Errors
/// The value is not a whole number from 1 to 1024.
pub fn worker_threads(value: Option<&str>) -> anyhow::Result<Option<usize>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=1024) => Ok(Some(n)),
            _ => anyhow::bail!("{WORKER_THREADS_ENV}={v:?}: expected a number from 1 to 1024"),
        },
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let threads = std::env::var(WORKER_THREADS_ENV).ok();
    if let Some(n) = worker_threads(threads.as_deref())? {
        builder.worker_threads(n);
    }
    Ok(builder.enable_all().build()?)
}

/// The number of serving threads of `taler-paywall serve`: [`WORKER_THREADS_ENV`], or one per
/// CPU.
///
/// # Errors
/// As [`worker_threads`].
pub fn serving_threads() -> anyhow::Result<usize> {
    let threads = std::env::var(WORKER_THREADS_ENV).ok();
    Ok(match worker_threads(threads.as_deref())? {
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    })
}

/// `taler-paywall serve`: the serving threads run their own runtimes (see
/// [`crate::gateway::serve`]); this one runs signals, reloads and the admin listener.
///
/// # Errors
/// Configuration or startup failures (bad file, port in use).
pub fn serve(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(crate::gateway::serve(config, Some(path.to_owned())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_accepts_small_positive_numbers_only() {
        assert_eq!(worker_threads(None).unwrap(), None);
        assert_eq!(worker_threads(Some("")).unwrap(), None);
        assert_eq!(worker_threads(Some("2")).unwrap(), Some(2));
        assert_eq!(worker_threads(Some(" 4 ")).unwrap(), Some(4));
        for bad in ["0", "-1", "two", "1025", "1.5"] {
            assert!(worker_threads(Some(bad)).is_err(), "{bad}");
        }
    }
}
