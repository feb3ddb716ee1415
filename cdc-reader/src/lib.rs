//! InstaShop CDC reader: Postgres logical replication (pgoutput) to per-table
//! Kafka topics in Debezium's JSON change-event format.

pub mod change;
pub mod error;
// Kafka side (engineer K).
pub mod envelope;
pub mod sink;
pub mod topic;
pub mod value;

pub use error::Error;
