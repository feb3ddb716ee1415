//! A throwaway PostgreSQL cluster of the test's own, for what the shared
//! instance must not see: another `wal_level`, or a restart under load.
//!
//! `initdb` into a fresh directory, started on a free port with its unix
//! socket in that directory. As root (CI), PostgreSQL refuses to run, so
//! `initdb` and `pg_ctl` run as the `postgres` OS user through `runuser`,
//! the way `scripts/up` does, in a directory under `/tmp` that user owns.
//! Dropping the value stops the server (`pg_ctl stop -m immediate`) and
//! removes the directory, also when the test failed.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use super::unique;

/// Debian's PostgreSQL 15 binaries (as `PG_BIN` in scripts/lib/common.sh);
/// `PG_BIN` in the environment points elsewhere.
fn pg_bin() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_owned()),
    );
    assert!(
        dir.join("initdb").is_file(),
        "no initdb in {} (install postgresql-15, or set PG_BIN)",
        dir.display()
    );
    dir
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The superuser's password (scram over TCP, trust over the socket).
pub const SUPERUSER_PASSWORD: &str = "postgres";

/// A running scratch cluster; dropped = stopped and deleted.
#[derive(Debug)]
pub struct ScratchPg {
    /// Holds the data directory, the socket, the log.
    dir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    as_postgres: bool,
}

impl ScratchPg {
    /// Initialises and starts a cluster with `settings` (`name = value`
    /// lines of postgresql.conf, e.g. `("wal_level", "replica")`).
    pub fn start(tag: &str, settings: &[(&str, &str)]) -> ScratchPg {
        let as_postgres = running_as_root();
        // /tmp and not TMPDIR as root: the postgres user must reach the directory.
        let base = if as_postgres {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(unique(&format!("cdct_pg_{tag}")));
        std::fs::create_dir(&dir).unwrap();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        let mut pg = ScratchPg {
            dir,
            port: 0,
            as_postgres,
        };
        if as_postgres {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "chown: {}", stderr(&out));
        }
        let out = pg.run(
            "initdb",
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "-U",
                "postgres",
                &format!("--pwfile={}", pwfile.display()),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", stderr(&out));
        let mut conf = format!(
            "\n# scratch cluster of a cdc-reader test\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             timezone = 'UTC'\n\
             shared_buffers = '32MB'\n\
             max_connections = 50\n\
             fsync = off\n",
            pg.dir.display()
        );
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{value}'\n"));
        }
        pg.append_conf(&conf);
        // The port is free when chosen but another process may take it
        // before the server binds: choose again then.
        for attempt in 1..=3 {
            pg.port = crate::support::listen_port();
            pg.append_conf(&format!("port = {}\n", pg.port));
            let out = pg.pg_ctl(&["start", "-w", "-t", "60"]);
            if out.status.success() {
                return pg;
            }
            assert!(
                attempt < 3,
                "the scratch cluster did not start: {}\n{}",
                stderr(&out),
                pg.log_tail()
            );
        }
        unreachable!()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn append_conf(&self, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Runs a PostgreSQL binary, as the postgres user when we are root.
    fn run(&self, bin: &str, args: &[&str]) -> Output {
        let path = pg_bin().join(bin);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.args(args).output().unwrap()
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data();
        let log = self.log_file();
        let mut all = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// `pg_ctl restart -m fast`: clients are disconnected, running
    /// transactions roll back, a shutdown checkpoint persists the slots.
    pub fn restart(&self) {
        let out = self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}\n{}",
            stderr(&out),
            self.log_tail()
        );
    }

    /// Superuser URL of database `db`.
    pub fn admin_url(&self, db: &str) -> String {
        self.url("postgres", SUPERUSER_PASSWORD, db)
    }

    /// URL of `db` for `user` with `password`, over TCP.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// The last lines of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        super::tail(
            &std::fs::read_to_string(self.log_file()).unwrap_or_default(),
            20,
        )
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stderr(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
