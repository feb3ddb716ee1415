//! `metrics-consumer` binary: wiring only; see the library for the behaviour.

use std::process::ExitCode;

use clap::Parser;

// The batch fold allocates many small strings per event; glibc's malloc
// spent about a third of the consumer's CPU on them (perf), mimalloc far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before the runtime starts threads: loading the env file sets variables.
    local_stack::envfile::load();
    let config = metrics_consumer::Config::parse();
    local_stack::init_tracing();
    local_stack::main(|shutdown| metrics_consumer::run(config, shutdown))
}
