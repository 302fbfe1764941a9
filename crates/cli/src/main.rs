//! The `zerovsock` command.
//!
//! * `zerovsock perf`: copy vs zerocopy throughput on the in-process loopback, with `memcpy`
//!   of the same sizes measured in the same run (see `perf.rs`).
//! * `zerovsock vhost`: the vhost-user-vsock device for QEMU guests (see `vhost.rs`).

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod perf;
mod vhost;

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
    /// The vhost-user-vsock device for a QEMU (cloud-hypervisor, crosvm) guest, with hybrid
    /// Unix-socket endpoints.
    Vhost(vhost::VhostArgs),
}

fn main() {
    let result = match Cli::parse().command {
        Command::Perf(args) => perf::run(args),
        Command::Vhost(args) => vhost::run(args),
    };
    if let Err(error) = result {
        // The chain of causes, without a backtrace: these are reports to a user.
        eprintln!("zerovsock: {error:#}");
        std::process::exit(1);
    }
}
