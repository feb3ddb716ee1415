//! `dashboard` binary: wiring only; see the library for the behaviour.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before the runtime starts threads: loading the env file sets variables.
    local_stack::envfile::load();
    let config = dashboard::Config::parse();
    local_stack::init_tracing();
    local_stack::main(|shutdown| dashboard::run(config, shutdown))
}
