//! `dashboard` binary: wiring only; see the library for the behaviour.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    local_stack::envfile::load();
    let config = dashboard::Config::parse();
    local_stack::init_tracing();
    match try_main(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(config: dashboard::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = local_stack::shutdown::on_signal();
        dashboard::run(config, shutdown).await
    })?;
    Ok(())
}
