//! Prometheus text exposition format (version 0.0.4): parsing what the
//! cdc-reader and the metrics-consumer serve. The dashboard's own `/metrics`
//! is written by `prometheus-client` (see [`crate::collector::Stats`]).
//!
//! The parser is pure and lenient: comment lines (`# HELP`, `# TYPE`) are
//! skipped, and a malformed sample line is skipped rather than failing the
//! whole scrape, because one odd line from another binary must not blank the
//! pipeline panel. Timestamps after the value are accepted and ignored.

/// One sample: metric name, labels in the order written, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `cdc_reader_replication_lag_bytes`.
    pub name: String,
    /// Label pairs with escapes resolved.
    pub labels: Vec<(String, String)>,
    /// Sample value (`NaN`, `+Inf` and `-Inf` included).
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a whole exposition body. Lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// Parses one sample line; `None` for comments, blank lines and garbage.
pub fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remaining;
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next()?)?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (the opening brace already consumed); returns the
/// labels and the text after the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        if key.is_empty() {
            return None;
        }
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        };
        labels.push((key.to_owned(), value));
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        }
    }
}

fn parse_value(raw: &str) -> Option<f64> {
    match raw {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

/// Sum of every sample named `name` (all label sets); `None` when absent.
pub fn sum(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = false;
    let total = samples
        .iter()
        .filter(|s| s.name == name)
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Escapes a label value as the exposition format writes it.
    fn escape_label(value: &str) -> String {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    #[test]
    fn parses_samples_labels_comments_and_timestamps() {
        let text = "# HELP cdc_reader_replication_lag_bytes Bytes behind.\n\
            # TYPE cdc_reader_replication_lag_bytes gauge\n\
            cdc_reader_replication_lag_bytes{database=\"crm\"} 1024\n\
            cdc_reader_events_total{database=\"instashop\",table=\"transaction\",op=\"c\"} 7 1700000000000\n\
            up 1\n\
            \n\
            weird{label=\"a\\\"b\\\\c\\nd\", other = \"x\" ,} 2.5e3\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].name, "cdc_reader_replication_lag_bytes");
        assert_eq!(samples[0].label("database"), Some("crm"));
        assert_eq!(samples[0].value, 1024.0);
        assert_eq!(samples[1].label("op"), Some("c"));
        assert_eq!(samples[1].value, 7.0);
        assert_eq!(samples[2].labels, vec![]);
        assert_eq!(samples[3].label("label"), Some("a\"b\\c\nd"));
        assert_eq!(samples[3].label("other"), Some("x"));
        assert_eq!(samples[3].value, 2500.0);
    }

    #[test]
    fn special_values_parse() {
        assert_eq!(parse_line("a +Inf").map(|s| s.value), Some(f64::INFINITY));
        assert_eq!(
            parse_line("a -Inf").map(|s| s.value),
            Some(f64::NEG_INFINITY)
        );
        assert!(parse_line("a NaN").is_some_and(|s| s.value.is_nan()));
    }

    #[test]
    fn garbage_lines_are_skipped_not_fatal() {
        let samples = parse("not a metric line\n{x=\"1\"} 3\n1abc 2\nok{a=\"1\" 5\nfine 3\n");
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].name, "fine");
    }

    #[test]
    fn sum_adds_all_label_sets_and_reports_absence() {
        let samples = parse("x{p=\"0\"} 3\nx{p=\"1\"} 4\ny 1\n");
        assert_eq!(sum(&samples, "x"), Some(7.0));
        assert_eq!(sum(&samples, "z"), None);
    }

    /// xorshift64*: a dependency-free generator for the randomized tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn pick(&mut self, chars: &[char]) -> char {
            chars[(self.next() % chars.len() as u64) as usize]
        }
    }

    #[test]
    fn random_input_never_panics() {
        let alphabet: Vec<char> = "ab_:{}\",=\\ \t#+-.eE0123456789NaInf\u{e9}\n"
            .chars()
            .collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = rng.next() % 40;
            let line: String = (0..len).map(|_| rng.pick(&alphabet)).collect();
            let _ = parse(&line);
        }
    }

    #[test]
    fn random_labels_round_trip_through_escaping() {
        let alphabet: Vec<char> = "ab\"\\\n{},= \u{e9}".chars().collect();
        let mut rng = Rng(42);
        for i in 0..2_000 {
            let value: String = (0..rng.next() % 12).map(|_| rng.pick(&alphabet)).collect();
            let number = (rng.next() % 1_000_000) as f64;
            let line = format!(
                "m_{i}{{k=\"{}\",db=\"crm\"}} {number}",
                escape_label(&value)
            );
            let sample = parse_line(&line).unwrap_or_else(|| panic!("did not parse: {line}"));
            assert_eq!(sample.name, format!("m_{i}"));
            assert_eq!(sample.label("k"), Some(value.as_str()), "{line}");
            assert_eq!(sample.label("db"), Some("crm"));
            assert_eq!(sample.value, number);
        }
    }

    #[test]
    fn own_metrics_parse_back() {
        let stats = crate::collector::Stats::default();
        stats.ticks.inc();
        stats.state.set(2);
        stats.last_tick_seconds.set(0.25);
        let samples = parse(&local_stack::exposition::render(&stats.registry()));
        assert_eq!(sum(&samples, "dashboard_up"), Some(1.0));
        assert_eq!(sum(&samples, "dashboard_ticks_total"), Some(1.0));
        assert_eq!(sum(&samples, "dashboard_pipeline_state"), Some(2.0));
        assert_eq!(sum(&samples, "dashboard_tick_duration_seconds"), Some(0.25));
        assert_eq!(sum(&samples, "dashboard_stream_clients"), Some(0.0));
        assert_eq!(escape_label("a\"b\\"), "a\\\"b\\\\");
    }
}
