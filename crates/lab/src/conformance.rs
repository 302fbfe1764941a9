//! `conformance`: the conformance suite (`zerovsock test`) paired with the kernel's C
//! `vsock_test` 6.12 inside lab guests, one guest per pairing:
//!
//! * `c-baseline`: the C client against the C server on the guest's `vsock_loopback`: the lab
//!   itself, so a failure of a mixed pairing can be told apart from a lab problem;
//! * `ours`: `zerovsock test --transport kernel`, both halves in one process on
//!   `vsock_loopback`, checked against `crates/conformance/expected/kernel.txt`;
//! * `c-client`: the C client against our server (`--mode server --kernel-6.12`);
//! * `c-server`: our client against the C server;
//! * `device`: our host half on the device's native sockets (`zerovsock test --transport
//!   device --mode server`, a host process serving `vhost-user-vsock-pci`) against the C
//!   client in a guest, whose control connection reaches the host through QEMU's user network;
//! * `device-ours`: the same host half against our client on the guest kernel's `AF_VSOCK`,
//!   the whole list (the later tests and io_uring included) through the device;
//! * `device-host-client`: our host half as the client (connects initiated by the host through
//!   the device) against the C server in a guest, whose control port is forwarded from the
//!   host's loopback.
//!
//! The server side always starts first and the client is started only once the server printed
//! `Control socket listening` (both tools print it once the control port listens). Nothing
//! probes the control port: the server takes the first connection as its one control client.
//! The one exception is `device-host-client`: the host half must serve the device before QEMU
//! starts, so it starts first and keeps connecting (`--control-retry`) until the guest's
//! server speaks first on a connection; QEMU accepts forwarded connections before anything
//! listens in the guest, and closes them, which counts as not there yet.
//! Guests get two vCPUs (see `GUEST_CPUS`). Every pairing runs even when an earlier one failed;
//! a failed one is reported with its output and the guest's whole console, and the command
//! exits non-zero.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use zerovsock_lab::{
    build_host_binary, build_static_binary, CTool, Guest, Lab, NetLink, HOST_FROM_GUEST,
    SOURCE_PACKAGE, USER_NET_UP,
};

/// The control port inside a guest (both tools' usual one).
const GUEST_CONTROL_PORT: u16 = 1234;
/// What both tools print once their control port listens.
const LISTENING: &str = "Control socket listening";
/// The CID our device gives its guest.
const DEVICE_GUEST_CID: u32 = 3;
/// Virtual CPUs per guest. The guest kernel delivers vsock packets from workqueues
/// (`vsock_loopback`'s worker, the virtio transport's RX worker); on one vCPU they run only when
/// the tests' threads yield, and two of the C tool's 6.12 tests lose the race they leave open,
/// where the server announces over TCP what it just did on vsock: 17 SHUT_RD (`SHUTRDDONE`
/// reaches the client before its socket saw the shutdown, so its send succeeds) and 21 double
/// bind (`LISTENING` reaches it before its old connection got its RST, so the rebind fails with
/// EADDRINUSE). Measured here on one vCPU, half the full runs lost one of them in a pairing with
/// one of our halves (ours/ours and the device included; C/C never); on two, as any machine
/// that runs vsock_test has, none in ten.
const GUEST_CPUS: u32 = 2;
/// How long a host half may take to start listening, and to finish after its guest ended.
const HOST_PATIENCE: Duration = Duration::from_secs(120);

/// One pairing of the suite's halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pairing {
    /// The C client against the C server in one guest (the lab's own baseline).
    CBaseline,
    /// Both halves ours, in one process, on the guest kernel's vsock_loopback.
    Ours,
    /// The C client against our server in one guest.
    CClient,
    /// Our client against the C server in one guest.
    CServer,
    /// Our host half on the device against the C client in a guest.
    Device,
    /// Our host half on the device against our client on the kernel in a guest, whole list.
    DeviceOurs,
    /// Our host half on the device as the client, against the C server in a guest.
    DeviceHostClient,
}

impl Pairing {
    pub const ALL: [Pairing; 7] = [
        Pairing::CBaseline,
        Pairing::Ours,
        Pairing::CClient,
        Pairing::CServer,
        Pairing::Device,
        Pairing::DeviceOurs,
        Pairing::DeviceHostClient,
    ];

    fn title(self) -> &'static str {
        match self {
            Pairing::CBaseline => "C client / C server (baseline), vsock_loopback",
            Pairing::Ours => "ours / ours, vsock_loopback",
            Pairing::CClient => "C client / our server, vsock_loopback",
            Pairing::CServer => "our client / C server, vsock_loopback",
            Pairing::Device => "C client in a guest / our device host server",
            Pairing::DeviceOurs => {
                "our kernel client in a guest / our device host server, whole list"
            }
            Pairing::DeviceHostClient => "C server in a guest / our device host client",
        }
    }

    /// Whether a run with `--only` flags `only` (none: the default set) runs this pairing.
    /// `DeviceHostClient` runs only when named: in test 21 the host client rebinds its port as
    /// soon as the guest's `LISTENING` arrives through QEMU's user network, while the guest's
    /// RST for the old connection still crosses the device's TX queue; it lost that race (the
    /// C tool's own) in one of three full runs, and a lost race ends a pairing.
    fn selected(self, only: &[Pairing]) -> bool {
        if only.is_empty() {
            self != Pairing::DeviceHostClient
        } else {
            only.contains(&self)
        }
    }

    fn needs_ours_in_guest(self) -> bool {
        matches!(self, Pairing::Ours | Pairing::CClient | Pairing::CServer | Pairing::DeviceOurs)
    }

    fn on_device(self) -> bool {
        matches!(self, Pairing::Device | Pairing::DeviceOurs | Pairing::DeviceHostClient)
    }
}

/// How one pairing went.
struct Ran {
    pairing: Pairing,
    passed: bool,
    time: Duration,
    /// What to show when it failed: exit statuses, outputs, the console.
    failure: String,
}

pub fn run(guest: &Guest, only: &[Pairing]) -> Result<()> {
    let guest = &Guest { cpus: GUEST_CPUS, ..guest.clone() };
    let pairings: Vec<Pairing> = Pairing::ALL.into_iter().filter(|p| p.selected(only)).collect();
    let lab = Lab::prepare()?;
    let ctool = lab.vsock_test()?;
    let ours_guest = if pairings.iter().any(|p| p.needs_ours_in_guest()) {
        Some(build_static_binary("zerovsock-cli", "zerovsock")?)
    } else {
        None
    };
    let ours_host = if pairings.iter().any(|p| p.on_device()) {
        Some(build_host_binary("zerovsock-cli", "zerovsock")?)
    } else {
        None
    };
    println!(
        "conformance: the kernel's vsock_test from {SOURCE_PACKAGE} {}; guest kernel {}",
        ctool.version,
        lab.kernel().package
    );
    let mut ran = Vec::new();
    for pairing in pairings {
        println!("\n== {}", pairing.title());
        let started = Instant::now();
        let result = match pairing {
            Pairing::Device | Pairing::DeviceOurs | Pairing::DeviceHostClient => {
                let host = ours_host.as_deref().context("no host binary")?;
                let in_guest = match pairing {
                    Pairing::DeviceOurs => {
                        ours_guest.as_deref().context("zerovsock was not built for the guest")?
                    }
                    _ => &ctool.path,
                };
                device(&lab, guest, pairing, in_guest, host)
            }
            _ => in_one_guest(&lab, guest, &ctool, ours_guest.as_deref(), pairing),
        };
        let (passed, failure) = match result {
            Ok(failure) => (failure.is_none(), failure.unwrap_or_default()),
            Err(error) => (false, format!("{error:#}")),
        };
        let time = started.elapsed();
        println!("== {}: {} in {time:.1?}", pairing.title(), if passed { "PASS" } else { "FAIL" });
        ran.push(Ran { pairing, passed, time, failure });
    }
    let failed: Vec<&Ran> = ran.iter().filter(|r| !r.passed).collect();
    for r in &failed {
        println!("\n== FAILED: {}\n{}", r.pairing.title(), r.failure);
    }
    println!("\nconformance pairings (vsock_test from {SOURCE_PACKAGE} {}):", ctool.version);
    for r in &ran {
        println!(
            "  {:<4} {:>7.1?}  {}",
            if r.passed { "PASS" } else { "FAIL" },
            r.time,
            r.pairing.title()
        );
    }
    println!(
        "conformance: {} passed, {} failed, {:.1?} in all",
        ran.len() - failed.len(),
        failed.len(),
        ran.iter().map(|r| r.time).sum::<Duration>()
    );
    if !failed.is_empty() {
        bail!("{} of {} conformance pairings failed", failed.len(), ran.len());
    }
    Ok(())
}

/// `vsock_test`'s command line on the guest's `vsock_loopback`.
fn c_tool(mode: &str) -> String {
    let host = if mode == "client" { " --control-host=127.0.0.1" } else { "" };
    format!("/bin/vsock_test --mode={mode}{host} --control-port={GUEST_CONTROL_PORT} --peer-cid=1")
}

/// `zerovsock test`'s command line on the guest's `vsock_loopback`.
fn ours(mode: &str) -> String {
    let host = if mode == "client" { " --control-host 127.0.0.1" } else { "" };
    format!(
        "/bin/zerovsock test --transport kernel --mode {mode}{host} \
         --control-port {GUEST_CONTROL_PORT} --peer-cid 1 --kernel-6.12"
    )
}

/// The guest script for one pairing on `vsock_loopback`.
fn script(pairing: Pairing) -> String {
    match pairing {
        Pairing::Ours => "/bin/zerovsock test --transport kernel\n".to_owned(),
        Pairing::CBaseline => server_then_client(&c_tool("server"), &c_tool("client")),
        Pairing::CClient => server_then_client(&ours("server"), &c_tool("client")),
        Pairing::CServer => server_then_client(&c_tool("server"), &ours("client")),
        Pairing::Device | Pairing::DeviceOurs | Pairing::DeviceHostClient => {
            unreachable!("the device pairings run one half on the host")
        }
    }
}

/// A script that starts `server` in the background, starts `client` once the server printed
/// that its control port listens (never probing the port: the server would take the probe as
/// its one control client), waits for both and succeeds only if both exited 0. The server's
/// output is kept in a file and printed after the client's.
fn server_then_client(server: &str, client: &str) -> String {
    format!(
        "{server} > /tmp/server.out 2>&1 &\n\
         server=$!\n\
         i=0\n\
         while ! grep -q '{LISTENING}' /tmp/server.out; do\n\
         \x20 kill -0 $server 2>/dev/null || break\n\
         \x20 i=$((i+1)); [ $i -ge 600 ] && break\n\
         \x20 sleep 0.1\n\
         done\n\
         echo '--- client: {client}'\n\
         {client}\n\
         client_status=$?\n\
         wait $server\n\
         server_status=$?\n\
         echo '--- server: {server}'\n\
         cat /tmp/server.out\n\
         echo \"--- client exit $client_status, server exit $server_status\"\n\
         [ $client_status -eq 0 ] && [ $server_status -eq 0 ]\n"
    )
}

/// Runs a pairing in one guest; `Ok(Some(report))` when it failed.
fn in_one_guest(
    lab: &Lab,
    guest: &Guest,
    ctool: &CTool,
    ours: Option<&Path>,
    pairing: Pairing,
) -> Result<Option<String>> {
    let mut binaries = vec![ctool.path.clone()];
    if pairing.needs_ours_in_guest() {
        binaries.push(ours.context("zerovsock was not built for the guest")?.to_path_buf());
    }
    let outcome = lab.run(&binaries, &script(pairing), guest)?;
    print_outcome(&outcome);
    Ok((outcome.exit != 0).then(|| {
        format!("guest script exit {}; the guest's console:\n{}", outcome.exit, outcome.console)
    }))
}

/// A device pairing: our host half as a child process serving the guest's
/// `vhost-user-vsock-pci` (see [`roles`]); `in_guest` is the guest half's binary.
fn device(
    lab: &Lab,
    guest: &Guest,
    pairing: Pairing,
    in_guest: &Path,
    host_binary: &Path,
) -> Result<Option<String>> {
    let dir = lab.workdir()?;
    let socket = dir.join("vhost.sock");
    let log_path = dir.join("host.log");
    let port = free_port()?;
    let roles = roles(pairing, &socket, port);
    let mut host = spawn_host(host_binary, roles.host_args.clone(), &log_path)?;
    let result = device_guest(lab, guest, in_guest, &roles, &socket, &log_path, &mut host);
    let host_status = finish(&mut host, HOST_PATIENCE);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("--- host: zerovsock {}", roles.host_args.join(" "));
    print!("{log}");
    let host_part = match &host_status {
        Ok(status) => format!("host {status}"),
        Err(error) => format!("{error:#}"),
    };
    println!("--- {host_part}");
    let guest_part = match &result {
        Ok(o) if o.exit == 0 => None,
        Ok(o) => Some(format!("guest script exit {}; the guest's console:\n{}", o.exit, o.console)),
        Err(error) => Some(format!("the guest failed: {error:#}")),
    };
    let host_ok = host_status.as_ref().is_ok_and(ExitStatus::success);
    if host_ok && guest_part.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(None);
    }
    Ok(Some(format!(
        "{host_part}; host output:\n{log}\n{}",
        guest_part.unwrap_or_else(|| "the guest script exited 0".to_owned())
    )))
}

/// How a device pairing splits between the host and the guest.
struct Roles {
    /// `zerovsock`'s arguments on the host.
    host_args: Vec<String>,
    /// The guest half's command.
    guest_command: String,
    /// The guest's network to the host's loopback.
    net: NetLink,
    /// The host half is the control server: the guest boots once it listens. (A host client
    /// starts first, serving the device, and keeps connecting until the guest's server
    /// speaks.)
    host_listens: bool,
}

/// The halves of a device pairing, with control port `port` on the host's loopback: the
/// guest reaches it through QEMU's user network (10.0.2.2), or it is forwarded to the guest's
/// control port when the guest is the server. The host is CID 2, the guest CID 3.
fn roles(pairing: Pairing, socket: &Path, port: u16) -> Roles {
    let mut host_args: Vec<String> =
        ["test", "--transport", "device", "--vhost-socket"].map(str::to_owned).into();
    host_args.push(socket.display().to_string());
    let mode = if pairing == Pairing::DeviceHostClient { "client" } else { "server" };
    for (flag, value) in [
        ("--mode", mode.to_owned()),
        ("--guest-cid", DEVICE_GUEST_CID.to_string()),
        ("--peer-cid", DEVICE_GUEST_CID.to_string()),
        ("--control-host", "127.0.0.1".to_owned()),
        ("--control-port", port.to_string()),
    ] {
        host_args.push(flag.to_owned());
        host_args.push(value);
    }
    if pairing == Pairing::DeviceHostClient {
        host_args.extend(["--control-retry".to_owned(), HOST_PATIENCE.as_secs().to_string()]);
    }
    if pairing != Pairing::DeviceOurs {
        host_args.push("--kernel-6.12".to_owned());
    }
    let (guest_command, net) = match pairing {
        Pairing::DeviceOurs => (
            format!(
                "/bin/zerovsock test --transport kernel --mode client \
                 --control-host {HOST_FROM_GUEST} --control-port {port} --peer-cid 2"
            ),
            NetLink::User,
        ),
        Pairing::DeviceHostClient => (
            format!(
                "/bin/vsock_test --mode=server --control-port={GUEST_CONTROL_PORT} --peer-cid=2"
            ),
            NetLink::UserForward { host: port, guest: GUEST_CONTROL_PORT },
        ),
        _ => (
            format!(
                "/bin/vsock_test --mode=client --control-host={HOST_FROM_GUEST} \
                 --control-port={port} --peer-cid=2"
            ),
            NetLink::User,
        ),
    };
    Roles { host_args, guest_command, net, host_listens: pairing != Pairing::DeviceHostClient }
}

fn device_guest(
    lab: &Lab,
    guest: &Guest,
    in_guest: &Path,
    roles: &Roles,
    socket: &Path,
    log: &Path,
    host: &mut Child,
) -> Result<zerovsock_lab::Outcome> {
    wait_for_host(host, socket, log, roles.host_listens)?;
    let command = &roles.guest_command;
    let script = format!("{USER_NET_UP}{command}\n");
    let guest = Guest {
        vhost_user_vsock: Some(socket.to_path_buf()),
        net: Some(roles.net),
        ..guest.clone()
    };
    let outcome = lab.run(&[in_guest.to_path_buf()], &script, &guest)?;
    println!("--- guest: {command}");
    print_outcome(&outcome);
    Ok(outcome)
}

/// What a guest printed, then its boot and run times and exit status.
pub(crate) fn print_outcome(outcome: &zerovsock_lab::Outcome) {
    print!("{}", outcome.output);
    println!(
        "lab: boot {:.1?}, run {:.1?}, exit {}",
        outcome.boot_time,
        outcome.total_time.saturating_sub(outcome.boot_time),
        outcome.exit
    );
}

pub(crate) fn spawn_host(binary: &Path, args: Vec<String>, log: &Path) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// Waits until the host half serves the vhost-user socket and, when it is the control
/// server, its control port listens.
fn wait_for_host(host: &mut Child, socket: &Path, log: &Path, listens: bool) -> Result<()> {
    let deadline = Instant::now() + HOST_PATIENCE;
    loop {
        let printed = std::fs::read_to_string(log).unwrap_or_default();
        if socket.exists() && (!listens || printed.contains(LISTENING)) {
            return Ok(());
        }
        if let Some(status) = host.try_wait()? {
            bail!("the host half exited ({status}) before it listened");
        }
        if Instant::now() > deadline {
            bail!("the host half did not listen within {HOST_PATIENCE:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the child to exit, killing it after `patience`.
pub(crate) fn finish(child: &mut Child, patience: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the host half was still running {patience:?} after its guest ended; killed");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_starts_first_and_the_port_is_never_probed() {
        let text = server_then_client("SERVER", "CLIENT");
        let server = text.find("SERVER > /tmp/server.out 2>&1 &").unwrap();
        let waits = text.find(&format!("grep -q '{LISTENING}' /tmp/server.out")).unwrap();
        let client = text.find("\nCLIENT\n").unwrap();
        assert!(server < waits && waits < client);
        assert!(!text.contains("nc "), "a probe would be taken as the control client");
        assert!(text.contains("wait $server"));
        assert!(text.trim_end().ends_with("[ $client_status -eq 0 ] && [ $server_status -eq 0 ]"));
    }

    #[test]
    fn guest_pairings_use_the_6_12_list_on_vsock_loopback() {
        let mixed = script(Pairing::CClient);
        assert!(mixed.contains(
            "/bin/zerovsock test --transport kernel --mode server --control-port 1234 \
             --peer-cid 1 --kernel-6.12 >"
        ));
        assert!(mixed.contains(
            "/bin/vsock_test --mode=client --control-host=127.0.0.1 --control-port=1234 \
             --peer-cid=1\n"
        ));
        let reverse = script(Pairing::CServer);
        assert!(reverse.starts_with("/bin/vsock_test --mode=server --control-port=1234"));
        assert!(reverse.contains("--mode client --control-host 127.0.0.1"));
        assert_eq!(script(Pairing::Ours), "/bin/zerovsock test --transport kernel\n");
    }

    #[test]
    fn the_device_host_half_serves_guest_cid_3_on_the_host_loopback() {
        let socket = Path::new("/w/vhost.sock");
        let server = roles(Pairing::Device, socket, 40000);
        assert_eq!(
            server.host_args.join(" "),
            "test --transport device --vhost-socket /w/vhost.sock --mode server --guest-cid 3 \
             --peer-cid 3 --control-host 127.0.0.1 --control-port 40000 --kernel-6.12"
        );
        assert_eq!(
            server.guest_command,
            "/bin/vsock_test --mode=client --control-host=10.0.2.2 --control-port=40000 \
             --peer-cid=2"
        );
        assert!(server.host_listens && server.net == NetLink::User);
        // Against our own client the whole list runs.
        let ours = roles(Pairing::DeviceOurs, socket, 40000);
        assert!(!ours.host_args.contains(&"--kernel-6.12".to_owned()));
        assert_eq!(
            ours.guest_command,
            "/bin/zerovsock test --transport kernel --mode client --control-host 10.0.2.2 \
             --control-port 40000 --peer-cid 2"
        );
    }

    #[test]
    fn the_racy_host_client_pairing_runs_only_when_named() {
        let default: Vec<Pairing> = Pairing::ALL.into_iter().filter(|p| p.selected(&[])).collect();
        assert_eq!(default.len(), Pairing::ALL.len() - 1);
        assert!(!default.contains(&Pairing::DeviceHostClient));
        assert!(Pairing::DeviceHostClient.selected(&[Pairing::DeviceHostClient]));
        assert!(!Pairing::Ours.selected(&[Pairing::DeviceHostClient]));
    }

    #[test]
    fn a_device_host_client_reaches_the_guests_server_through_a_forwarded_port() {
        let client = roles(Pairing::DeviceHostClient, Path::new("/w/vhost.sock"), 40000);
        let args = client.host_args.join(" ");
        assert!(args.contains("--mode client") && args.contains("--control-port 40000"), "{args}");
        assert!(args.contains("--control-retry 120") && args.ends_with("--kernel-6.12"), "{args}");
        assert_eq!(
            client.guest_command,
            "/bin/vsock_test --mode=server --control-port=1234 --peer-cid=2"
        );
        assert_eq!(client.net, NetLink::UserForward { host: 40000, guest: 1234 });
        assert!(!client.host_listens, "the host client starts first, serving the device");
    }
}
