//! How far a consumer is behind: per partition, the high watermark minus
//! the next offset it will read, measured on a client of its own every few
//! seconds (a watermark request blocks for up to its timeout, so never on
//! the consuming thread).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use tokio_util::sync::CancellationToken;

/// A partition: topic and number.
pub type Partition = (String, i32);

/// Pause between two measurements.
const EVERY: Duration = Duration::from_secs(5);

/// Longest wait for one partition's watermarks.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Messages behind the high watermark of each partition in `next` (the next
/// offset to read per partition); a partition whose watermarks do not come
/// within 2 s is left out of this measurement. `None` when `shutdown`
/// came first.
pub fn measure<C: ConsumerContext>(
    watermarks: &BaseConsumer<C>,
    next: impl IntoIterator<Item = (Partition, i64)>,
    shutdown: &CancellationToken,
) -> Option<BTreeMap<Partition, i64>> {
    let mut lag = BTreeMap::new();
    for ((topic, partition), next) in next {
        if shutdown.is_cancelled() {
            return None;
        }
        if let Ok((_, high)) = watermarks.fetch_watermarks(&topic, partition, WATERMARK_TIMEOUT) {
            lag.insert((topic, partition), (high - next).max(0));
        }
    }
    Some(lag)
}

/// Measures every 5 s until `shutdown` (or until `next` has no positions to
/// give: their owner is gone) and hands each measurement to `report`.
pub fn watch<C: ConsumerContext>(
    watermarks: &BaseConsumer<C>,
    next: impl Fn() -> Option<Vec<(Partition, i64)>>,
    report: impl Fn(BTreeMap<Partition, i64>),
    shutdown: &CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let Some(positions) = next() else {
            return;
        };
        let Some(lag) = measure(watermarks, positions, shutdown) else {
            return;
        };
        report(lag);
        // In short steps, so a stop does not wait for the whole pause.
        let steps = EVERY.as_millis() / 100;
        for _ in 0..steps {
            if shutdown.is_cancelled() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
