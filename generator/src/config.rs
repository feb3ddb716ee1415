//! Command-line flags and environment variables. Precedence: flag >
//! environment > `.local/env` (loaded by `main`) > default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Writes realistic InstaShop traffic into the four databases: purchases with
/// their lines, stock movements and shipments, buyers' behaviour, and the
/// lifecycle around them (payments resolving, refunds, deliveries, signups,
/// price changes, deletions).
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Config {
    /// Events per second (purchases and behaviour events), or `max`.
    #[arg(long, env = "GENERATOR_RATE", default_value = "10", value_parser = parse_rate)]
    pub rate: Rate,

    /// Stop after this long (`20s`, `5m`, `1h`, `500ms`; a bare number is seconds).
    #[arg(long, env = "GENERATOR_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after this many events.
    #[arg(long, env = "GENERATOR_EVENTS")]
    pub events: Option<u64>,

    /// Share of purchases vs. behaviour events, `purchases/behaviour` (e.g.
    /// `70/30`) or the purchase percentage alone.
    #[arg(long, env = "GENERATOR_MIX", default_value = "70/30", value_parser = parse_mix)]
    pub mix: Mix,

    /// Events grouped into one database transaction per database. Default:
    /// 1 up to 50 events/s, then rate/50 (at most 500), and 2000 with
    /// `--rate max`.
    #[arg(long, env = "GENERATOR_BATCH", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: Option<u32>,

    /// Seed of every random decision: the same seed on fresh databases gives
    /// the same rows.
    #[arg(long, env = "GENERATOR_SEED", default_value_t = 42)]
    pub seed: u64,

    /// `instashop` database (shops, buyers, products, purchases). Default:
    /// the local stack's, postgres://instashop_app:***@127.0.0.1:54329/instashop.
    #[arg(long, env = "PG_INSTASHOP_URL", default_value = DEFAULT_INSTASHOP_URL, hide_env_values = true, hide_default_value = true)]
    pub instashop_url: String,

    /// `crm` database (behaviour events). Default: the local stack's.
    #[arg(long, env = "PG_CRM_URL", default_value = DEFAULT_CRM_URL, hide_env_values = true, hide_default_value = true)]
    pub crm_url: String,

    /// `erp` database (stock). Default: the local stack's.
    #[arg(long, env = "PG_ERP_URL", default_value = DEFAULT_ERP_URL, hide_env_values = true, hide_default_value = true)]
    pub erp_url: String,

    /// `ecommerce` database (carriers, shipments). Default: the local stack's.
    #[arg(long, env = "PG_ECOMMERCE_URL", default_value = DEFAULT_ECOMMERCE_URL, hide_env_values = true, hide_default_value = true)]
    pub ecommerce_url: String,

    /// Where `/metrics` (Prometheus text) is served; empty to turn it off.
    #[arg(long, env = "GENERATOR_METRICS_ADDR", default_value = "127.0.0.1:9471", value_parser = parse_addr)]
    pub metrics_addr: MetricsAddr,

    /// Seconds between progress lines on stderr; 0 turns them off.
    #[arg(long, env = "GENERATOR_PROGRESS_SECS", default_value_t = 5)]
    pub progress_secs: u64,

    /// Seconds to wait for each database connection at start.
    #[arg(long, env = "GENERATOR_CONNECT_TIMEOUT_SECS", default_value_t = 5)]
    pub connect_timeout_secs: u64,
}

const DEFAULT_INSTASHOP_URL: &str =
    "postgres://instashop_app:instashop_app@127.0.0.1:54329/instashop";
const DEFAULT_CRM_URL: &str = "postgres://instashop_app:instashop_app@127.0.0.1:54329/crm";
const DEFAULT_ERP_URL: &str = "postgres://instashop_app:instashop_app@127.0.0.1:54329/erp";
const DEFAULT_ECOMMERCE_URL: &str =
    "postgres://instashop_app:instashop_app@127.0.0.1:54329/ecommerce";

impl Config {
    /// A config with every default, for tests and embedding.
    pub fn defaults() -> Config {
        Config {
            rate: Rate::PerSecond(10.0),
            duration: None,
            events: None,
            mix: Mix {
                purchase_share: 0.7,
            },
            batch: None,
            seed: 42,
            instashop_url: DEFAULT_INSTASHOP_URL.into(),
            crm_url: DEFAULT_CRM_URL.into(),
            erp_url: DEFAULT_ERP_URL.into(),
            ecommerce_url: DEFAULT_ECOMMERCE_URL.into(),
            metrics_addr: MetricsAddr(None),
            progress_secs: 5,
            connect_timeout_secs: 5,
        }
    }

    /// Events per database transaction.
    pub fn batch_size(&self) -> u32 {
        self.batch.unwrap_or(match self.rate {
            Rate::Max => 2000,
            Rate::PerSecond(r) => ((r / 50.0) as u32).clamp(1, 500),
        })
    }

    /// The URL of one database.
    pub fn url(&self, db: crate::op::Database) -> &str {
        use crate::op::Database;
        match db {
            Database::Instashop => &self.instashop_url,
            Database::Crm => &self.crm_url,
            Database::Erp => &self.erp_url,
            Database::Ecommerce => &self.ecommerce_url,
        }
    }
}

/// Target event rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// As fast as the databases take it.
    Max,
    /// Events per second.
    PerSecond(f64),
}

/// Share of events that are purchases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// 0.0 ..= 1.0.
    pub purchase_share: f64,
}

/// Optional listen address of the metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// Parses `max` or a positive number of events per second.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
        _ => Err(format!(
            "`{s}` is not a rate: give events per second (e.g. 10, 0.5) or `max`"
        )),
    }
}

/// Parses `500ms`, `20s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not a duration: use e.g. 20s, 5m, 1h, 500ms");
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "sec" | "secs" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `70/30` or `70` (percent purchases).
pub fn parse_mix(s: &str) -> Result<Mix, String> {
    let bad = || format!("`{s}` is not a mix: use purchases/behaviour, e.g. 70/30 or 100/0");
    let (p, b) = match s.split_once('/') {
        Some((p, b)) => (
            p.trim().parse::<f64>().map_err(|_| bad())?,
            b.trim().parse::<f64>().map_err(|_| bad())?,
        ),
        None => {
            let p = s.trim().parse::<f64>().map_err(|_| bad())?;
            (p, 100.0 - p)
        }
    };
    if p < 0.0 || b < 0.0 || p + b <= 0.0 || !(p + b).is_finite() {
        return Err(bad());
    }
    Ok(Mix {
        purchase_share: p / (p + b),
    })
}

/// Parses a socket address; empty means off.
pub fn parse_addr(s: &str) -> Result<MetricsAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| format!("`{s}` is not an address: use host:port, e.g. 127.0.0.1:9471"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("MAX"), Ok(Rate::Max));
        assert_eq!(parse_rate("10"), Ok(Rate::PerSecond(10.0)));
        assert_eq!(parse_rate("0.5"), Ok(Rate::PerSecond(0.5)));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn mixes() {
        assert_eq!(parse_mix("70/30").map(|m| m.purchase_share), Ok(0.7));
        assert_eq!(parse_mix("100/0").map(|m| m.purchase_share), Ok(1.0));
        assert_eq!(parse_mix("7/3").map(|m| m.purchase_share), Ok(0.7));
        assert_eq!(parse_mix("25").map(|m| m.purchase_share), Ok(0.25));
        assert!(parse_mix("0/0").is_err());
        assert!(parse_mix("-1/3").is_err());
    }

    #[test]
    fn batch_defaults_follow_rate() {
        let mut c = Config::defaults();
        assert_eq!(c.batch_size(), 1);
        c.rate = Rate::PerSecond(1000.0);
        assert_eq!(c.batch_size(), 20);
        c.rate = Rate::Max;
        assert_eq!(c.batch_size(), 2000);
        c.batch = Some(7);
        assert_eq!(c.batch_size(), 7);
    }

    #[test]
    fn metrics_addr_can_be_off() {
        assert_eq!(parse_addr(""), Ok(MetricsAddr(None)));
        assert!(parse_addr("127.0.0.1:0").is_ok_and(|a| a.0.is_some()));
        assert!(parse_addr("nope").is_err());
    }
}
