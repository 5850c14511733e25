//! TODO: sandbox (being written).
use std::net::SocketAddr;
/// Runs the sandbox from the command line.
///
/// # Errors
/// Startup failures.
pub async fn run_cli(
    _listen: SocketAddr,
    _token: String,
    _public_url: Option<String>,
    _faults: Option<String>,
) -> anyhow::Result<()> {
    anyhow::bail!("not yet implemented")
}
