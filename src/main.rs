//! The `monoscope` binary: parse the command line, run, print errors with their causes.

use std::process::ExitCode;

fn main() -> ExitCode {
    match monoscope::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
