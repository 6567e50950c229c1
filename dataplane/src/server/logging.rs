//! Log output of every Sluice server process: one place decides the format.

/// Logs to stderr, filtered by RUST_LOG (default `info,openraft=warn`), as JSON lines
/// when asked.
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    // openraft narrates every election and snapshot at info: a replicated broker's
    // own log says when it leads or follows, so by default only openraft's warnings
    // and errors (a peer unreachable, a failed write) show. RUST_LOG overrides.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
