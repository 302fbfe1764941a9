//! The `zerovsock` command.
//!
//! * `zerovsock perf`: copy vs zerocopy throughput on the in-process loopback, with `memcpy`
//!   of the same sizes measured in the same run (see `perf.rs`).
//! * `zerovsock vhost`: the vhost-user-vsock device for QEMU guests (see `vhost.rs`).
//! * `zerovsock test`: the conformance suite, pairing with the kernel's `vsock_test` (see
//!   `test.rs`).

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod perf;
mod test;
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
    /// The conformance suite: the kernel vsock_test's tests and control protocol, against the
    /// loopback, the device or the kernel, or one half of a pairing with the C vsock_test.
    Test(test::TestArgs),
}

fn main() {
    let result = match Cli::parse().command {
        Command::Perf(args) => perf::run(args),
        Command::Vhost(args) => vhost::run(args),
        Command::Test(args) => test::run(args),
    };
    if let Err(error) = result {
        // The chain of causes, without a backtrace: these are reports to a user.
        eprintln!("zerovsock: {error:#}");
        std::process::exit(1);
    }
}
