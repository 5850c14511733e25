//! The `taler-paywall` binary: parses the command line, sets up logging and hands over to
//! the library. See `src/lib.rs` for the design.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        Command::Serve { config } => {
            taler_paywall::cli::init_logging();
            taler_paywall::cli::serve(&config)
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
