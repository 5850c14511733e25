//! TODO: gateway (being written).
use crate::config::Config;
/// Runs the gateway.
///
/// # Errors
/// Startup failures.
pub async fn serve(_config: Config, _path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    anyhow::bail!("not yet implemented")
}
