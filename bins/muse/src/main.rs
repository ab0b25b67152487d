use std::process::ExitCode;

/// mimalloc: under load, glibc's malloc and free took ~13 % of the
/// server's CPU (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    muse_server::cli::main()
}
