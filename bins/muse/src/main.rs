use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    muse_server::run(muse_server::Cli::parse())
}
