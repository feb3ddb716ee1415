//! `cdc-reader`: placeholder until its issue lands.

use clap::Parser;

/// InstaShop CDC cdc-reader.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {}

fn main() {
    local_stack::envfile::load();
    let _config = Config::parse();
}
