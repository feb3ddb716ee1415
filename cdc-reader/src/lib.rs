//! InstaShop CDC reader: Postgres logical replication (pgoutput) to per-table
//! Kafka topics in Debezium's JSON change-event format.

pub mod change;
