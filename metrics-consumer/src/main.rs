//! `metrics-consumer`: placeholder until its issue lands.

use clap::Parser;

/// InstaShop CDC metrics-consumer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {}

fn main() {
    local_stack::envfile::load();
    let _config = Config::parse();
}
