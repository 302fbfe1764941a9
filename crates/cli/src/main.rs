//! The `zerovsock` command.
//!
//! * `zerovsock perf`: copy vs zerocopy throughput on the in-process loopback, with `memcpy`
//!   of the same sizes measured in the same run (see `perf.rs`).

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod perf;

/// vsock with MSG_ZEROCOPY, in Rust.
#[derive(Parser, Debug)]
#[command(name = "zerovsock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy vs zerocopy throughput (vsock_perf-compatible flags) on the embedded loopback.
    Perf(perf::PerfArgs),
}

fn main() {
    let result = match Cli::parse().command {
        Command::Perf(args) => perf::run(args),
    };
    if let Err(error) = result {
        // The chain of causes, without a backtrace: these are reports to a user.
        eprintln!("zerovsock: {error:#}");
        std::process::exit(1);
    }
}
