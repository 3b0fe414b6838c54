//! The demo binaries' exit codes: the convention of `sluice-proxy` and `sluice-cp`
//! (their `cli` modules), so scripts read every Sluice program's exit the same way.
//!
//! clap exits with 2 on a bad flag; Sluice documents 64 (`EX_USAGE` from BSD's
//! sysexits.h) for every usage error. `--help` and `--version` are not errors: they
//! print to stdout and exit 0. Kept here rather than shared with the proxy so that the
//! demo programs do not link the proxy.

use clap::Parser;

/// The exit code of a usage error: a bad, missing or conflicting flag.
pub const EX_USAGE: u8 = 64;

/// Parses the process's arguments, or exits: 0 after `--help`/`--version` (printed
/// to stdout), [`EX_USAGE`] after any other error (clap's message on stderr, which
/// names the flag). Call it first in `main`, before anything needs dropping.
pub fn parse_args<T: Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // `use_stderr` is false exactly for the help and version displays.
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(i32::from(code));
        }
    }
}
