//! The `taler-paywall` binary: parses the command line, sets up logging and hands over to
//! the library. See `src/lib.rs` for the design.

/// jemalloc instead of glibc's allocator: hyper takes a fresh 8 KiB read buffer for most
/// requests on both sides of the proxy, and glibc served those through its slow path
/// (`_int_malloc`, fastbin consolidation): 6 % of the gateway's CPU time. See
/// `docs/benchmarks.md`. `.cargo/config.toml` gives jemalloc's 8–14 KiB size classes larger
/// slabs when it is built, for the same buffers ("Ninth session" there).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use taler_paywall::cli::LogFormat;

/// A reverse-proxy paywall gateway for GNU Taler.
#[derive(Parser)]
#[command(name = "taler-paywall", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM/SIGINT.
    Serve {
        /// The configuration file.
        #[arg(long, env = "TALER_PAYWALL_CONFIG")]
        config: PathBuf,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Log level or filter (`error`, `warn`, `info`, `debug`, `trace`, or a `RUST_LOG`
        /// style filter); `RUST_LOG`, when set, overrides it.
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Exit 0 if URL answers 200 within the timeout, else 1 (a container health check).
    Healthcheck {
        /// The URL to ask (plain http://), e.g. the admin listener's /healthz.
        #[arg(
            long,
            env = "TALER_PAYWALL_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:9090/healthz"
        )]
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Validate a configuration file and exit (0 valid, 1 invalid).
    Check {
        /// The configuration file.
        #[arg(long, env = "TALER_PAYWALL_CONFIG")]
        config: PathBuf,
    },
    /// Start a complete local demo on loopback: sample site, sandbox merchant, gateway.
    Demo {
        /// Port of the gateway (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Run only the built-in sandbox merchant backend (play money, in memory).
    SandboxMerchant {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9966")]
        listen: SocketAddr,
        /// Access token for the private API (with or without the `secret-token:` prefix).
        #[arg(long, default_value = "secret-token:sandbox")]
        token: String,
        /// Public base URL used in `order_status_url` and `taler_pay_uri` (default: from --listen).
        #[arg(long)]
        public_url: Option<String>,
        /// Enable fault injection from the start, e.g. `slow=500`, `status=503`, `unreachable`.
        #[arg(long)]
        faults: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => return taler_paywall::cli::check(&config),
        Command::Serve {
            config,
            log_format,
            log_level,
        } => {
            let log = taler_paywall::cli::init_buffered_logging(log_format, &log_level);
            let result = taler_paywall::cli::serve(&config);
            // The serving threads have written out their lines when `serve` returns.
            drop(log);
            result
        }
        Command::Healthcheck { url, timeout } => {
            return taler_paywall::cli::healthcheck(&url, timeout)
        }
        Command::Demo { port } => {
            taler_paywall::cli::init_logging();
            taler_paywall::cli::demo(port)
        }
        Command::SandboxMerchant {
            listen,
            token,
            public_url,
            faults,
        } => {
            taler_paywall::cli::init_logging();
            taler_paywall::cli::sandbox_merchant(listen, token, public_url, faults)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taler-paywall: {e:#}");
            ExitCode::FAILURE
        }
    }
}
