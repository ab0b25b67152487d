use std::process::ExitCode;

fn main() -> ExitCode {
    muse_server::cli::main()
}
