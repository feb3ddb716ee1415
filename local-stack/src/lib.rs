//! How the InstaShop CDC binaries find and talk about the local stack.
//!
//! Every binary runs with no arguments against the stack that `scripts/up`
//! starts. That script writes `.local/env`; [`envfile::load`] reads it into the
//! process environment *before* clap parses flags, so the precedence is
//! flag > environment variable > env file > built-in default.

pub mod envfile;
pub mod exposition;
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

/// The body of every binary's `main` after its config is parsed: runs
/// `run(shutdown)` on a multi-threaded runtime, with `shutdown` cancelled by
/// Ctrl-C/SIGTERM, and turns the result into the exit status. A failure is
/// one line on stderr, `error: <message>: <cause>: ...`, never a backtrace.
pub fn main<F, Fut, E>(run: F) -> std::process::ExitCode
where
    F: FnOnce(tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async { run(shutdown::on_signal()).await }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once (messages that
/// already quote their source are not repeated).
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot connect to database crm")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn joins_causes_on_one_line() {
        let e = Outer(std::io::Error::other("connection refused\n(os error 111)"));
        assert_eq!(
            one_line(&e),
            "cannot connect to database crm: connection refused (os error 111)"
        );
    }
}
