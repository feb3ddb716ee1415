//! How the InstaShop CDC binaries find and talk about the local stack.
//!
//! Every binary runs with no arguments against the stack that `scripts/up`
//! starts. That script writes `.local/env`; [`envfile::load`] reads it into the
//! process environment *before* clap parses flags, so the precedence is
//! flag > environment variable > env file > built-in default.

pub mod envfile;
pub mod redact;
pub mod shutdown;

/// Installs the `tracing` subscriber shared by all binaries.
///
/// `RUST_LOG` selects levels (default `info`); `LOG_FORMAT=json` is not offered
/// on purpose: the fmt layer's key=value fields are already structured and keep
/// the dependency tree small.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
