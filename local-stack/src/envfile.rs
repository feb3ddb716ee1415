//! The `KEY=value` file that `scripts/up` writes (default `.local/env`).

use std::path::{Path, PathBuf};

/// Environment variable naming the env file; empty disables loading.
pub const ENV_FILE_VAR: &str = "INSTASHOP_ENV_FILE";

/// Parses `KEY=value` lines. Blank lines and `#` comments are skipped, an
/// optional `export ` prefix and one pair of surrounding quotes are removed.
/// Lines without `=` are ignored rather than rejected: the file is written by
/// our own script and a stray line must not stop a binary from starting.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (key, value) = line.split_once('=')?;
            let key = key.trim();
            if key.is_empty() {
                return None;
            }
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Where the env file is looked for: `$INSTASHOP_ENV_FILE`, else `.local/env`
/// in the current directory or the nearest parent that has one (so binaries
/// and tests work from any directory of the checkout).
pub fn locate() -> Option<PathBuf> {
    if let Some(explicit) = std::env::var_os(ENV_FILE_VAR) {
        if explicit.is_empty() {
            return None;
        }
        return Some(PathBuf::from(explicit));
    }
    let mut dir = std::env::current_dir().ok()?;
    loop {
        let candidate = dir.join(".local").join("env");
        if candidate.is_file() {
            return Some(candidate);
        }
        if !dir.pop() {
            return None;
        }
    }
}

/// Loads the env file into the process environment without overriding
/// variables that are already set. Returns the file used, if any.
///
/// Call this at the top of `main`, before the tokio runtime starts threads:
/// changing the environment is only sound while the process is single-threaded.
pub fn load() -> Option<PathBuf> {
    let path = locate()?;
    load_from(&path).then_some(path)
}

/// Loads one env file; `false` when it cannot be read.
pub fn load_from(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    for (key, value) in parse(&text) {
        if std::env::var_os(&key).is_none() {
            set(&key, &value);
        }
    }
    true
}

#[allow(unsafe_code)]
fn set(key: &str, value: &str) {
    // Sound because `load` is documented to run before any other thread exists.
    unsafe { std::env::set_var(key, value) }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_comments_quotes_and_export() {
        let parsed = parse(
            "# written by scripts/up\n\nexport A=1\nB = \"two words\"\nC='x=y'\nnot a pair\n=orphan\n",
        );
        assert_eq!(
            parsed,
            vec![
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two words".to_owned()),
                ("C".to_owned(), "x=y".to_owned()),
            ]
        );
    }
}
