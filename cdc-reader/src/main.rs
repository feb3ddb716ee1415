//! `cdc-reader` binary: wiring only; see the library for the behaviour.
//! `cdc-reader signal ...` writes a signal row instead of running.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before the runtime starts threads: loading the env file sets variables.
    local_stack::envfile::load();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "signal") {
        let cmd = cdc_reader::config::SignalCommand::parse_from(&args[1..]);
        local_stack::init_tracing();
        return local_stack::main(|_| async move {
            let id = cdc_reader::chunk::send_signal(&cmd).await?;
            println!("signal {id} written");
            Ok::<(), cdc_reader::Error>(())
        });
    }
    let config = cdc_reader::Config::parse();
    local_stack::init_tracing();
    local_stack::main(|shutdown| cdc_reader::run(config, shutdown))
}
