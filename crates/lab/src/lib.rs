//! The VM lab: real Linux guests for the tests that need the kernel's vsock.
//!
//! The host this project is developed on must never open an `AF_VSOCK` socket itself, so kernel
//! vsock code runs only inside guests the lab boots: Debian's newest 6.12 cloud kernel under
//! QEMU's software emulation (`-accel tcg,thread=multi -cpu max`; KVM here cannot boot a normal
//! kernel), with an initramfs of static busybox, the vsock modules (`vsock`,
//! `vmw_vsock_virtio_transport_common`, `vmw_vsock_virtio_transport`, `vsock_loopback`) and the
//! project's static binaries. Guests get no vsock device unless a vhost-user backend socket is
//! named, so a guest's vsock traffic stays on its own `vsock_loopback` (CID 1).
//!
//! Guests reach the host only when asked: a `vhost-user-vsock-pci` device on a backend socket,
//! a `-netdev socket` link to another guest, or QEMU's user network ([`NetLink::User`]), on
//! which the guest reaches the host's 127.0.0.1 at [`HOST_FROM_GUEST`] once its script ran
//! [`USER_NET_UP`]. For pairings with the kernel's own tools, [`Lab::vsock_test`] and
//! [`Lab::vsock_perf`] build the C `vsock_test` and `vsock_perf` from Debian's
//! `linux-source-6.12` (cached per package version).
//!
//! A guest is marked twice — `zerovsock.lab=1` on its kernel command line and the file
//! [`GUEST_MARKER`] — and [`in_lab_guest`] checks both, for tests that must refuse to run
//! anywhere else.
//!
//! ```no_run
//! let lab = zerovsock_lab::Lab::prepare()?;
//! let outcome = lab.run(&[], "echo hello from the guest", &zerovsock_lab::Guest::default())?;
//! assert_eq!(outcome.exit, 0);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![forbid(unsafe_code)]

mod ctool;
mod initramfs;
mod qemu;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub use ctool::{CTool, SOURCE_PACKAGE};
pub use initramfs::{Cpio, GUEST_CMDLINE_FLAG, GUEST_MARKER};
pub use qemu::{Guest, NetLink, Outcome, HOST_FROM_GUEST, USER_NET_UP};
pub use setup::Kernel;

/// Whether this process runs inside a guest the lab booted.
pub fn in_lab_guest() -> bool {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline.split_whitespace().any(|word| word == GUEST_CMDLINE_FLAG)
        && Path::new(GUEST_MARKER).exists()
}

/// A prepared lab: packages installed, kernel unpacked.
#[derive(Debug, Clone)]
pub struct Lab {
    cache: PathBuf,
    kernel: Kernel,
    applets: Vec<String>,
}

impl Lab {
    /// Installs what is missing and unpacks the kernel into the cache (`$ZEROVSOCK_LAB_DIR`, or
    /// `target/lab` of the workspace).
    pub fn prepare() -> Result<Lab> {
        let cache = match std::env::var_os("ZEROVSOCK_LAB_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => workspace_root()?.join("target/lab"),
        };
        std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
        setup::ensure_packages()?;
        let kernel = setup::fetch_kernel(&cache)?;
        let applets = setup::busybox_applets()?;
        Ok(Lab { cache, kernel, applets })
    }

    /// A fresh directory in the lab's cache, for one run's files.
    pub fn workdir(&self) -> Result<PathBuf> {
        tempdir(&self.cache)
    }

    /// The guest kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The kernel's C `vsock_test`, built statically from Debian's `linux-source-6.12` into
    /// the cache the first time (see [`CTool`]).
    pub fn vsock_test(&self) -> Result<CTool> {
        ctool::built(&self.cache, ctool::VSOCK_TEST)
    }

    /// The kernel's C `vsock_perf`, built as [`Lab::vsock_test`] is, beside it.
    pub fn vsock_perf(&self) -> Result<CTool> {
        ctool::built(&self.cache, ctool::VSOCK_PERF)
    }

    /// Boots a guest with `binaries` in `/bin`, runs `script` with `sh`, and returns its exit
    /// status and output.
    pub fn run(&self, binaries: &[PathBuf], script: &str, guest: &Guest) -> Result<Outcome> {
        let workdir = tempdir(&self.cache)?;
        let image = initramfs::Image {
            busybox: Path::new(setup::BUSYBOX),
            applets: &self.applets,
            modules: &self.kernel.modules,
            binaries,
            script,
        };
        let initramfs = workdir.join("initramfs.cpio");
        initramfs::write_file(&initramfs, &initramfs::build(&image)?)?;
        let outcome = guest.run(&self.kernel, &initramfs, &workdir);
        if outcome.is_ok() {
            let _ = std::fs::remove_dir_all(&workdir);
        }
        outcome
    }
}

fn tempdir(cache: &Path) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let dir = cache.join(format!("run-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The workspace root, from cargo.
pub fn workspace_root() -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .output()
        .context("running cargo locate-project")?;
    if !out.status.success() {
        bail!("cargo locate-project failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let manifest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(manifest.parent().context("manifest has no parent")?.to_path_buf())
}

/// Builds the test binaries of `package` as static executables for the guest and returns
/// their paths (test targets only, not the binaries or examples built beside them).
pub fn build_static_tests(package: &str) -> Result<Vec<PathBuf>> {
    let messages = guest_build(&["test", "--no-run", "--release", "--locked", "-p", package])
        .with_context(|| format!("building the guest tests of {package}"))?;
    let binaries = test_executables(&messages);
    if binaries.is_empty() {
        bail!("cargo built no test binary for {package}");
    }
    Ok(binaries)
}

/// Builds one example of `package` as a static executable for the guest and returns its path.
pub fn build_static_example(package: &str, example: &str) -> Result<PathBuf> {
    let messages =
        guest_build(&["build", "--release", "--locked", "-p", package, "--example", example])
            .with_context(|| format!("building example {example} of {package}"))?;
    executable(&messages, example)
}

/// Builds binary `bin` of `package` as a static executable for the guest and returns its path.
pub fn build_static_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let messages = guest_build(&["build", "--release", "--locked", "-p", package, "--bin", bin])
        .with_context(|| format!("building binary {bin} of {package}"))?;
    executable(&messages, bin)
}

/// The executable of target `name` among cargo's JSON messages.
fn executable(messages: &str, name: &str) -> Result<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == name)
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no executable {name}"))
}

/// Builds binary `bin` of `package` for this host (release, the workspace's own target
/// directory) and returns its path.
pub fn build_host_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let root = workspace_root()?;
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--release", "--locked", "-p", package, "--bin", bin])
        .args(["--message-format", "json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("building {bin} of {package} failed");
    }
    executable(&String::from_utf8_lossy(&out.stdout), bin)
}

/// Runs `cargo ARGS` for the guest (static executables, in `target/guest`) and returns cargo's
/// JSON messages.
fn guest_build(args: &[&str]) -> Result<String> {
    let root = workspace_root()?;
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(args)
        .args(["--target", "x86_64-unknown-linux-gnu", "--message-format", "json"])
        .arg("--target-dir")
        .arg(root.join("target/guest"))
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The test executables among cargo's JSON messages (`--message-format json`): artifacts built
/// with the test profile (unit tests of a library or binary, integration tests). The binaries
/// and examples `cargo test` builds beside them have executables too, but are not tests.
fn test_executables(messages: &str) -> Vec<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["profile"]["test"] == true)
        .filter_map(|message| message["executable"].as_str().map(PathBuf::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `cargo test --no-run --message-format json` prints for a package with a library,
    /// a binary, an example and an integration test (fields the lab does not read trimmed).
    const MESSAGES: &str = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"crate_types":["lib"],"name":"p","test":true},"profile":{"opt_level":"3","test":false},"executable":null,"fresh":false}
{"reason":"compiler-artifact","target":{"kind":["lib"],"crate_types":["lib"],"name":"p","test":true},"profile":{"opt_level":"3","test":true},"executable":"/t/deps/p-1111","fresh":false}
{"reason":"compiler-artifact","target":{"kind":["bin"],"crate_types":["bin"],"name":"tool","test":true},"profile":{"opt_level":"3","test":false},"executable":"/t/tool","fresh":false}
{"reason":"compiler-artifact","target":{"kind":["bin"],"crate_types":["bin"],"name":"tool","test":true},"profile":{"opt_level":"3","test":true},"executable":"/t/deps/tool-2222","fresh":false}
{"reason":"compiler-artifact","target":{"kind":["example"],"crate_types":["bin"],"name":"demo","test":false},"profile":{"opt_level":"3","test":false},"executable":"/t/examples/demo","fresh":false}
{"reason":"compiler-artifact","target":{"kind":["test"],"crate_types":["bin"],"name":"kernel","test":true},"profile":{"opt_level":"3","test":true},"executable":"/t/deps/kernel-3333","fresh":false}
{"reason":"build-finished","success":true}"#;

    #[test]
    fn only_test_targets_are_run_in_the_guest() {
        let found = test_executables(MESSAGES);
        let expected: Vec<PathBuf> = ["/t/deps/p-1111", "/t/deps/tool-2222", "/t/deps/kernel-3333"]
            .map(PathBuf::from)
            .into();
        assert_eq!(found, expected, "the binary and the example are not tests");
    }
}
