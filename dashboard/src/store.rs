//! Reads the metric keys from Redis in one pipelined round trip.
//!
//! One multiplexed connection is kept and shared by the collector and the
//! `/api/metrics` handler; after an error it is dropped and the next read
//! reconnects, so a Redis restart shows as a red tick, not a dead dashboard.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use crate::error::Error;
use crate::snapshot::{self, RedisValues};

/// Connect and response timeout: the page ticks every second.
const TIMEOUT: Duration = Duration::from_millis(800);

/// Redis access for the metric keys under one prefix.
#[derive(Debug)]
pub struct Store {
    client: redis::Client,
    url: String,
    prefix: String,
    connection: Mutex<Option<MultiplexedConnection>>,
}

impl Store {
    /// Checks the URL; does not connect yet.
    pub fn new(url: &str, prefix: &str) -> Result<Store, Error> {
        let redacted = local_stack::redact::url(url);
        let client = redis::Client::open(url).map_err(|source| Error::RedisUrl {
            url: redacted.clone(),
            source,
        })?;
        Ok(Store {
            client,
            url: redacted,
            prefix: prefix.to_owned(),
            connection: Mutex::new(None),
        })
    }

    fn redis_error(&self, source: redis::RedisError) -> Error {
        Error::Redis {
            url: self.url.clone(),
            source,
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, Error> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.redis_error(e))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Reads every key the snapshot needs, with windows relative to `now_ms`.
    pub async fn read(&self, now_ms: i64) -> Result<RedisValues, Error> {
        let result = self.read_once(now_ms).await;
        if matches!(result, Err(Error::Redis { .. })) {
            *self.connection.lock().await = None;
        }
        result
    }

    async fn read_once(&self, now_ms: i64) -> Result<RedisValues, Error> {
        let mut conn = self.connection().await?;
        let mut string_keys: Vec<String> = catalog::Table::ALL
            .into_iter()
            .map(snapshot::count_key)
            .collect();
        string_keys.extend(
            [
                snapshot::REVENUE_TOTAL,
                snapshot::STOCK_UNITS,
                snapshot::DASHBOARD_JSON,
            ]
            .map(str::to_owned),
        );
        let starts = snapshot::window_starts(now_ms);
        let p = &self.prefix;

        let mut pipe = redis::pipe();
        // A key of the wrong type must fail that key, not the connection.
        pipe.ignore_errors();
        pipe.cmd("MGET").arg(
            string_keys
                .iter()
                .map(|k| format!("{p}{k}"))
                .collect::<Vec<_>>(),
        );
        for key in snapshot::HASH_KEYS {
            pipe.cmd("HGETALL").arg(format!("{p}{key}"));
        }
        for start in &starts {
            pipe.cmd("HGETALL")
                .arg(format!("{p}{}", snapshot::window_key(*start)));
        }
        let replies: Vec<redis::Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;

        let mut replies = replies.into_iter();
        let mut next = |key: &str| {
            replies.next().ok_or_else(|| Error::RedisValue {
                key: format!("{p}{key}"),
                source: redis::ParsingError::from("missing reply in pipeline".to_owned()),
            })
        };
        let mut values = RedisValues::default();
        let strings: Vec<Option<String>> =
            convert(next("(mget)")?, "(mget)", p).unwrap_or_else(|_| {
                values.bad_keys.push("(mget of the string keys)".to_owned());
                Vec::new()
            });
        values.strings = string_keys.iter().cloned().zip(strings).collect();
        for key in snapshot::HASH_KEYS {
            match convert::<BTreeMap<String, String>>(next(key)?, key, p) {
                Ok(hash) => {
                    values.hashes.insert(key.to_owned(), hash);
                }
                Err(_) => values.bad_keys.push(format!("{p}{key}")),
            }
        }
        for start in starts {
            let key = snapshot::window_key(start);
            match convert::<BTreeMap<String, String>>(next(&key)?, &key, p) {
                Ok(hash) if !hash.is_empty() => {
                    values.windows.insert(start, hash);
                }
                Ok(_) => {}
                Err(_) => values.bad_keys.push(format!("{p}{key}")),
            }
        }
        Ok(values)
    }
}

fn convert<T: redis::FromRedisValue>(
    value: redis::Value,
    key: &str,
    prefix: &str,
) -> Result<T, Error> {
    if let redis::Value::ServerError(err) = &value {
        // WRONGTYPE and friends: a key of the wrong Redis type.
        return Err(Error::RedisValue {
            key: format!("{prefix}{key}"),
            source: redis::ParsingError::from(format!("{err:?}")),
        });
    }
    redis::from_redis_value(value).map_err(|source| Error::RedisValue {
        key: format!("{prefix}{key}"),
        source,
    })
}
