//! Connection URLs in messages: passwords never reach a log line or an error.

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`.
/// Also handles libpq key/value strings (`password=...`). Anything else is
/// returned unchanged.
pub fn url(raw: &str) -> String {
    if let Some((scheme, rest)) = raw.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _password)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}{tail}");
        }
        return raw.to_owned();
    }
    raw.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn hides_url_password() {
        assert_eq!(
            url("postgres://cdc_reader:s3cr:et@127.0.0.1:54329/crm?sslmode=disable"),
            "postgres://cdc_reader:***@127.0.0.1:54329/crm?sslmode=disable"
        );
    }

    #[test]
    fn keeps_urls_without_password() {
        assert_eq!(
            url("redis://127.0.0.1:63790/0"),
            "redis://127.0.0.1:63790/0"
        );
        assert_eq!(url("postgres://app@h/db"), "postgres://app@h/db");
    }

    #[test]
    fn hides_keyword_password() {
        assert_eq!(
            url("host=/tmp user=app password=hunter2 dbname=erp"),
            "host=/tmp user=app password=*** dbname=erp"
        );
    }
}
