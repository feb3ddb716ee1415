//! `dwh-sink` binary: wiring only; see the library for the behaviour.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before the runtime starts threads: loading the env file sets variables.
    local_stack::envfile::load();
    let cli = dwh_sink::Cli::parse();
    local_stack::init_tracing();
    match cli.command {
        None => local_stack::main(|shutdown| dwh_sink::run(cli.config, shutdown)),
        Some(dwh_sink::Command::Verify(verify)) => {
            local_stack::main(|_shutdown| dwh_sink::verify::run(cli.config, verify))
        }
    }
}
