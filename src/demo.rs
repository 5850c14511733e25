//! TODO: demo (being written).
/// Runs the demo.
///
/// # Errors
/// Startup failures.
pub async fn run(_port: u16) -> anyhow::Result<()> {
    anyhow::bail!("not yet implemented")
}
