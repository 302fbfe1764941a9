//! `zerovsock-lab`: boot the project's guests.
//!
//! * `run [--bin FILE]... -- SCRIPT`: boot a guest with those binaries in `/bin`, run the
//!   script, print its output, exit with its status.
//! * `guest-tests [--package P]`: build P's tests as static binaries and run them inside a
//!   guest (their guest-only tests are `#[ignore]`d on the host and run here with `--ignored`).
//! * `selftest`: two guests at once, joined by a network link, exchange a line.
//! * `device-tests`: a guest with `vhost-user-vsock-pci` against the project's device (see
//!   `device.rs`).
//! * `device-bench`: the same guest against the device and vhost-device-vsock, measured (see
//!   `device_bench.rs`).
//! * `conformance [--only PAIRING]...`: the conformance suite paired with the kernel's C
//!   `vsock_test` in guests, and on the device with the C tool in a guest (see
//!   `conformance.rs`).
//! * `perf [--only PIECE]...`: `zerovsock perf` paired with the kernel's C `vsock_perf` on a
//!   guest's `vsock_loopback`, its kernel transport in a guest, and our device's host side with
//!   a real guest, both ways (see `perf.rs`).
//! * `rfc-bench --out FILE.md --svg FILE.svg`: the MSG_ZEROCOPY RFC's three tables (guest to
//!   host and host to guest through our device, loopback in a guest) made again with
//!   `zerovsock perf` (see `rfc_bench.rs`; `scripts/bench-rfc`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use zerovsock_lab::{build_static_tests, Guest, Lab, NetLink};

mod conformance;
mod device;
mod device_bench;
mod perf;
mod perf_lines;
mod rfc_bench;

#[derive(Parser, Debug)]
#[command(
    name = "zerovsock-lab",
    about = "Boot Linux guests under QEMU for the project's kernel tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Kill a guest after this many seconds.
    #[arg(long, global = true, default_value_t = 600)]
    timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a shell script in a fresh guest.
    Run {
        /// Host files to put in the guest's /bin.
        #[arg(long = "bin")]
        binaries: Vec<PathBuf>,
        /// The script (joined with spaces).
        #[arg(last = true, required = true)]
        script: Vec<String>,
    },
    /// Build a package's tests statically and run them in a guest.
    GuestTests {
        /// The package whose tests to run.
        #[arg(long, default_value = "zerovsock-linux")]
        package: String,
    },
    /// Boot two guests with a network link between them and pass a line across.
    Selftest,
    /// A guest with vhost-user-vsock-pci against the project's device: data both ways through
    /// the Unix endpoints and the socket API, MSG_ZEROCOPY from the guest, a refused connect.
    DeviceTests,
    /// The device bench with a real guest: zerovsock's device and vhost-device-vsock (when
    /// installed) side by side, both ways, at 4 KiB, 64 KiB and 1 MiB writes.
    DeviceBench,
    /// The conformance suite paired with the kernel's C vsock_test 6.12 (built from Debian's
    /// linux-source-6.12): C/C as the lab's baseline, ours/ours, C client/our server, our
    /// client/C server on a guest's vsock_loopback, and our device host half against the C
    /// client in a guest.
    Conformance {
        /// Run only these pairings (repeatable; default: all but device-host-client, whose
        /// test 21 loses the race the C tool leaves open too often for CI).
        #[arg(long, value_enum)]
        only: Vec<conformance::Pairing>,
    },
    /// `zerovsock perf` in guests: paired with the kernel's C vsock_perf 6.12 on
    /// vsock_loopback both ways (copy and zerocopy), its kernel transport (copy, zerocopy,
    /// io_uring SEND_ZC, verified), and our device's host side with a real guest both ways.
    Perf {
        /// Run only these checks (repeatable; default: all).
        #[arg(long, value_enum)]
        only: Vec<perf::Piece>,
    },
    /// The MSG_ZEROCOPY RFC's three tables (copy against zerocopy, 4K to 8M sends, time
    /// inside send()) made again in guests with zerovsock perf: guest to host and host to
    /// guest through our device (host side native), and the kernel's vsock_loopback beside
    /// ours in one guest. Writes a Markdown report and an SVG chart.
    RfcBench {
        /// The Markdown report.
        #[arg(long, default_value = "docs/perf-rfc.md")]
        out: PathBuf,
        /// The chart.
        #[arg(long, default_value = "docs/perf-rfc.svg")]
        svg: PathBuf,
    },
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("zerovsock-lab: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let guest = Guest { timeout: Duration::from_secs(cli.timeout), ..Guest::default() };
    match cli.command {
        Cmd::Run { binaries, script } => {
            let lab = Lab::prepare()?;
            let outcome = lab.run(&binaries, &script.join(" "), &guest)?;
            print!("{}", outcome.output);
            eprintln!(
                "lab: boot {:.1?}, total {:.1?}, exit {}",
                outcome.boot_time, outcome.total_time, outcome.exit
            );
            std::process::exit(outcome.exit);
        }
        Cmd::GuestTests { package } => guest_tests(&package, &guest),
        Cmd::Selftest => selftest(&guest),
        Cmd::DeviceTests => device::run(&guest),
        Cmd::DeviceBench => device_bench::run(&guest),
        Cmd::Conformance { only } => conformance::run(&guest, &only),
        Cmd::Perf { only } => perf::run(&guest, &only),
        Cmd::RfcBench { out, svg } => rfc_bench::run(&guest, &out, &svg),
    }
}

fn guest_tests(package: &str, guest: &Guest) -> Result<()> {
    let binaries = build_static_tests(package)?;
    let lab = Lab::prepare()?;
    let mut script = String::from("status=0\n");
    for binary in &binaries {
        let name = binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        script.push_str(&format!(
            "echo \"== {name}\"\n/bin/{name} --ignored --test-threads=1 || status=1\n"
        ));
    }
    script.push_str("exit $status\n");
    let outcome = lab.run(&binaries, &script, guest)?;
    print!("{}", outcome.output);
    println!(
        "lab: {} on {}: boot {:.1?}, suite {:.1?}, total {:.1?}",
        package,
        lab.kernel().package,
        outcome.boot_time,
        outcome.total_time.saturating_sub(outcome.boot_time),
        outcome.total_time
    );
    if outcome.exit != 0 {
        bail!("guest tests of {package} failed (exit {})", outcome.exit);
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn selftest(guest: &Guest) -> Result<()> {
    let lab = Lab::prepare()?;
    let port = free_port()?;
    // Addresses from TEST-NET-1: they exist only on the emulated link between the two guests.
    let listener_script = "ip addr add 192.0.2.1/24 dev eth0 && ip link set eth0 up\n\
                           nc -l -p 7000 > /tmp/got\n\
                           cat /tmp/got\n\
                           grep -q hello-across-the-link /tmp/got\n";
    let sender_script = "ip addr add 192.0.2.2/24 dev eth0 && ip link set eth0 up\n\
                         i=0\n\
                         while [ $i -lt 100 ]; do\n\
                           echo hello-across-the-link | nc 192.0.2.1 7000 && exit 0\n\
                           i=$((i+1)); sleep 0.3\n\
                         done\n\
                         exit 1\n";
    let first = Guest {
        net: Some(NetLink::Listen(port)),
        mac: "52:54:00:00:00:01".into(),
        ..guest.clone()
    };
    let second = Guest {
        net: Some(NetLink::Connect(port)),
        mac: "52:54:00:00:00:02".into(),
        ..guest.clone()
    };
    let lab_a = lab.clone();
    let a = thread::spawn(move || lab_a.run(&[], listener_script, &first));
    thread::sleep(Duration::from_millis(500));
    let b = lab.run(&[], sender_script, &second)?;
    let a = a.join().map_err(|_| anyhow::anyhow!("guest thread panicked"))??;
    println!(
        "lab selftest: listener exit {} ({:.1?} boot), sender exit {} ({:.1?} boot)\n{}",
        a.exit, a.boot_time, b.exit, b.boot_time, a.output
    );
    if a.exit != 0 || b.exit != 0 {
        bail!(
            "two-guest link test failed:\n--- listener\n{}\n--- sender\n{}",
            a.console,
            b.console
        );
    }
    // A guest that never finishes is killed at its timeout and reported with its console.
    let hung = Guest { timeout: Duration::from_secs(20), ..guest.clone() };
    match lab.run(&[], "echo about-to-hang; sleep 600", &hung) {
        Err(error)
            if error.to_string().contains("timed out")
                && error.to_string().contains("about-to-hang") =>
        {
            println!("lab selftest: a hung guest was killed at its 20 s timeout and its console reported");
            Ok(())
        }
        Err(error) => bail!("hung guest reported wrongly: {error:#}"),
        Ok(outcome) => bail!("a guest that sleeps 600 s finished: exit {}", outcome.exit),
    }
}
