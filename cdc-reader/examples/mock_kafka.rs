//! A librdkafka mock cluster (three brokers, in memory) in its own process,
//! for `scripts/bench-reader`: it isolates the reader's own cost from a real
//! broker's. Creates the topics named on the command line (3 partitions,
//! replication factor 3; the mock has no CreateTopics), prints the bootstrap
//! servers on one line, then serves until killed.
//!
//! Usage: `mock_kafka TOPIC...`

use std::io::Write as _;
use std::process::ExitCode;

use rdkafka::mocking::MockCluster;

fn main() -> ExitCode {
    let mock = match MockCluster::new(3) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: cannot start the mock cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    for topic in std::env::args().skip(1) {
        if let Err(e) = mock.create_topic(&topic, 3, 3) {
            eprintln!("error: cannot create topic {topic}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut out = std::io::stdout();
    if writeln!(out, "{}", mock.bootstrap_servers())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    loop {
        std::thread::park();
    }
}
