//! `cdc-reader`: wires configuration, logging, the runtime and signals to [`cdc_reader::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    local_stack::envfile::load();
    let config = cdc_reader::Config::parse();
    local_stack::init_tracing();
    match try_main(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(config: cdc_reader::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = local_stack::shutdown::on_signal();
        cdc_reader::run(config, shutdown).await
    })?;
    Ok(())
}
