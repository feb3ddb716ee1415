//! `generator`: wiring only; see the library for what it does.

use std::process::ExitCode;

use clap::Parser;
use generator::Config;

fn main() -> ExitCode {
    local_stack::envfile::load();
    let config = Config::parse();
    local_stack::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = local_stack::shutdown::on_signal();
        generator::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{:#}", anyhow::Error::from(e));
            eprintln!("error: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
