//! Booting one guest under QEMU's software emulation and collecting what it printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::initramfs::{BEGIN_MARK, EXIT_MARK, GUEST_CMDLINE_FLAG};
use crate::setup::Kernel;

/// A guest's network link, for control traffic: to another guest (`-netdev socket`: one side
/// listens on a loopback TCP port, the other connects to it), or to this host (`-netdev user`).
/// Guest addresses are set by the scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetLink {
    /// `-netdev socket,listen=127.0.0.1:PORT` (start this guest first).
    Listen(u16),
    /// `-netdev socket,connect=127.0.0.1:PORT`.
    Connect(u16),
    /// `-netdev user` (QEMU's user-mode network): the guest reaches the host's 127.0.0.1:PORT
    /// at [`HOST_FROM_GUEST`]:PORT once its script ran [`USER_NET_UP`].
    User,
    /// [`NetLink::User`] with the host's 127.0.0.1:`host` forwarded to the guest's port
    /// `guest` (at 10.0.2.15, which [`USER_NET_UP`] gives it). QEMU accepts on the host
    /// side at once, and closes the connection when nothing listens in the guest yet.
    UserForward {
        /// The port on the host's loopback.
        host: u16,
        /// The port in the guest.
        guest: u16,
    },
}

/// The host's loopback as a guest on [`NetLink::User`] reaches it.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// Shell lines that bring up a [`NetLink::User`] guest's `eth0` at QEMU's default address
/// (busybox `ip`; `/init` has already brought up `lo`).
pub const USER_NET_UP: &str = "ip link set lo up\n\
                               ip addr add 10.0.2.15/24 dev eth0\n\
                               ip link set eth0 up\n";

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Virtual CPUs. One avoids a rare early-boot oops of multi-threaded TCG when several
    /// guests run at once.
    pub cpus: u32,
    /// Attach `vhost-user-vsock-pci` to this backend socket (guest RAM is then a shared memfd,
    /// which a vhost-user backend needs).
    pub vhost_user_vsock: Option<PathBuf>,
    /// A network link to another guest.
    pub net: Option<NetLink>,
    /// MAC address of the network device (distinct per guest on one link).
    pub mac: String,
    /// Kill the guest after this long.
    pub timeout: Duration,
}

impl Default for Guest {
    fn default() -> Guest {
        Guest {
            memory_mb: 512,
            cpus: 1,
            vhost_user_vsock: None,
            net: None,
            mac: "52:54:00:12:34:56".into(),
            timeout: Duration::from_secs(300),
        }
    }
}

/// What a guest run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The script's exit status.
    pub exit: i32,
    /// What the script printed (the console between the begin and exit marks).
    pub output: String,
    /// The whole console, boot messages included.
    pub console: String,
    /// From QEMU start until the script began.
    pub boot_time: Duration,
    /// From QEMU start until QEMU exited.
    pub total_time: Duration,
}

impl Guest {
    /// The QEMU command line for this guest.
    pub fn command(&self, kernel: &Kernel, initramfs: &Path, console: &Path) -> Command {
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .args(["-m", &format!("{}M", self.memory_mb), "-smp", &self.cpus.to_string()])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(initramfs)
            .args(["-append", &format!("console=ttyS0 panic=-1 quiet {GUEST_CMDLINE_FLAG}")])
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
        if let Some(socket) = &self.vhost_user_vsock {
            let size = format!("{}M", self.memory_mb);
            qemu.args(["-object", &format!("memory-backend-memfd,id=mem,size={size},share=on")])
                .args(["-numa", "node,memdev=mem"])
                .args(["-chardev", &format!("socket,id=vhostvsock,path={}", socket.display())])
                .args(["-device", "vhost-user-vsock-pci,chardev=vhostvsock"]);
        }
        if let Some(link) = self.net {
            let netdev = match link {
                NetLink::Listen(port) => format!("socket,id=link,listen=127.0.0.1:{port}"),
                NetLink::Connect(port) => format!("socket,id=link,connect=127.0.0.1:{port}"),
                NetLink::User => "user,id=link".to_owned(),
                NetLink::UserForward { host, guest } => {
                    format!("user,id=link,hostfwd=tcp:127.0.0.1:{host}-10.0.2.15:{guest}")
                }
            };
            qemu.args(["-netdev", &netdev])
                .args(["-device", &format!("virtio-net-pci,netdev=link,mac={}", self.mac)]);
        }
        qemu.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        qemu
    }

    /// Boots, waits for the guest to power off (or kills it at the timeout), and reads the
    /// result from the console. A guest that oopses before the script starts (a rare TCG
    /// hiccup) is booted again, up to three times in all.
    pub fn run(&self, kernel: &Kernel, initramfs: &Path, workdir: &Path) -> Result<Outcome> {
        let mut last_error = None;
        for attempt in 1..=3 {
            let console = workdir.join(format!("console-{attempt}.log"));
            match self.run_once(kernel, initramfs, &console) {
                Ok(outcome) => return Ok(outcome),
                Err(error) if is_early_oops(&console) => {
                    eprintln!("lab: guest oopsed while booting (attempt {attempt}), retrying");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("guest failed to boot")))
    }

    fn run_once(&self, kernel: &Kernel, initramfs: &Path, console: &Path) -> Result<Outcome> {
        let _ = std::fs::remove_file(console);
        let started = Instant::now();
        let mut child = self
            .command(kernel, initramfs, console)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let mut boot_time = None;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if boot_time.is_none() && read_lossy(console).contains(BEGIN_MARK) {
                boot_time = Some(started.elapsed());
            }
            if started.elapsed() > self.timeout {
                kill(&mut child);
                let log = read_lossy(console);
                bail!("guest timed out after {:?}; console:\n{}", self.timeout, tail(&log, 60));
            }
            thread::sleep(Duration::from_millis(20));
        };
        let total_time = started.elapsed();
        let text = read_lossy(console).replace("\r\n", "\n");
        let stderr =
            child.stderr.take().map(std::io::read_to_string).transpose()?.unwrap_or_default();
        let Some(exit) = exit_status(&text) else {
            bail!(
                "guest ended ({status}) without reporting an exit status; qemu: {}; console:\n{}",
                stderr.trim(),
                tail(&text, 60)
            );
        };
        Ok(Outcome {
            exit,
            output: script_output(&text),
            boot_time: boot_time.unwrap_or(total_time),
            total_time,
            console: text,
        })
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

fn is_early_oops(console: &Path) -> bool {
    let text = read_lossy(console);
    let before_script = text.split(BEGIN_MARK).next().unwrap_or("");
    !text.contains(BEGIN_MARK)
        && (before_script.contains("Oops")
            || before_script.contains("Kernel panic")
            || before_script.contains("int3"))
}

fn exit_status(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|line| line.trim().strip_prefix(EXIT_MARK)?.trim().parse().ok())
}

fn script_output(console: &str) -> String {
    let after = console.split_once(BEGIN_MARK).map_or("", |(_, rest)| rest);
    let before = after.rsplit_once(EXIT_MARK).map_or(after, |(head, _)| head);
    before.trim_start_matches('\n').to_owned()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Kernel {
        Kernel { package: "k".into(), vmlinuz: "/k/vmlinuz".into(), modules: vec![] }
    }

    fn args(command: &Command) -> Vec<String> {
        command.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn plain_guest_uses_tcg_and_has_no_devices_but_the_console() {
        let args = args(&Guest::default().command(&kernel(), Path::new("/i"), Path::new("/c")));
        assert!(args.windows(2).any(|w| w == ["-accel", "tcg,thread=multi"]));
        assert!(args.contains(&"-nodefaults".to_string()));
        assert!(args.iter().any(|a| a.contains(GUEST_CMDLINE_FLAG)));
        let devices: Vec<&String> =
            args.windows(2).filter(|w| w[0] == "-device").map(|w| &w[1]).collect();
        assert!(
            devices.is_empty(),
            "no device at all, so no vsock device reaches the host: {devices:?}"
        );
    }

    #[test]
    fn vhost_user_guest_shares_its_memory() {
        let guest = Guest { vhost_user_vsock: Some("/run/vm3.vhost".into()), ..Guest::default() };
        let args = args(&guest.command(&kernel(), Path::new("/i"), Path::new("/c")));
        assert!(args.iter().any(|a| a == "memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(args.iter().any(|a| a == "socket,id=vhostvsock,path=/run/vm3.vhost"));
        assert!(args.iter().any(|a| a == "vhost-user-vsock-pci,chardev=vhostvsock"));
    }

    #[test]
    fn user_network_guest_gets_a_virtio_nic_on_slirp() {
        let guest = Guest { net: Some(NetLink::User), ..Guest::default() };
        let args = args(&guest.command(&kernel(), Path::new("/i"), Path::new("/c")));
        let pair = |flag: &str| -> Vec<String> {
            args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
        };
        assert_eq!(pair("-netdev"), ["user,id=link"]);
        assert_eq!(pair("-device"), ["virtio-net-pci,netdev=link,mac=52:54:00:12:34:56"]);
        assert!(USER_NET_UP.contains("dev eth0") && USER_NET_UP.contains("10.0.2.15/24"));
    }

    #[test]
    fn user_network_can_forward_a_host_port_into_the_guest() {
        let forward = Guest {
            net: Some(NetLink::UserForward { host: 40000, guest: 1234 }),
            ..Guest::default()
        };
        let args = args(&forward.command(&kernel(), Path::new("/i"), Path::new("/c")));
        let netdev: Vec<&String> =
            args.windows(2).filter(|w| w[0] == "-netdev").map(|w| &w[1]).collect();
        assert_eq!(netdev, ["user,id=link,hostfwd=tcp:127.0.0.1:40000-10.0.2.15:1234"]);
    }

    #[test]
    fn exit_status_and_output_come_from_the_marks() {
        let console = format!(
            "boot noise\n{BEGIN_MARK}\nline 1\nline 2\n{EXIT_MARK} 3\nreboot: Power down\n"
        );
        assert_eq!(exit_status(&console), Some(3));
        assert_eq!(script_output(&console), "line 1\nline 2\n");
    }
}
