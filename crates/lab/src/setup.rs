//! What the lab needs on the host: QEMU and busybox from Debian's packages, and the newest
//! Debian 6.12 cloud kernel with its vsock modules, unpacked into a cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Modules loaded at boot, in dependency order. The first four are required; the network ones
/// are loaded when present (they may be built in).
pub const MODULES: &[(&str, bool)] = &[
    ("vsock", true),
    ("vmw_vsock_virtio_transport_common", true),
    ("vmw_vsock_virtio_transport", true),
    ("vsock_loopback", true),
    ("failover", false),
    ("net_failover", false),
    ("virtio_net", false),
];

/// A guest kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The Debian package it came from.
    pub package: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// Decompressed modules, in load order.
    pub modules: Vec<PathBuf>,
}

pub(crate) fn run(command: &mut Command) -> Result<String> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// [`run`] for commands that reach the package registry: a transient failure is tried again,
/// three times in all, before it is reported.
pub(crate) fn run_fetching(command: &mut Command) -> Result<String> {
    let mut last = None;
    for attempt in 1..=3 {
        match run(command) {
            Ok(out) => return Ok(out),
            Err(error) => {
                eprintln!("lab: attempt {attempt} failed: {error:#}");
                last = Some(error);
                std::thread::sleep(std::time::Duration::from_secs(2 * attempt));
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{command:?} failed")))
}

pub(crate) fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs QEMU and static busybox with apt-get when they are missing.
pub fn ensure_packages() -> Result<()> {
    let mut missing = Vec::new();
    if !have("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !Path::new(BUSYBOX).exists() || !installed("busybox-static") {
        missing.push("busybox-static");
    }
    apt_install(&missing)
}

/// Installs Debian packages with apt-get (none: nothing to do).
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!("lab: installing {}", packages.join(" "));
    run_fetching(Command::new("apt-get").arg("update").arg("-qq"))?;
    run_fetching(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

/// Where Debian's busybox-static puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Whether a Debian package is installed (the plain `busybox` package is dynamically linked and
/// useless in an initramfs without its libraries; `busybox-static` replaces it).
pub(crate) fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The applets busybox offers.
pub fn busybox_applets() -> Result<Vec<String>> {
    let list = run(Command::new(BUSYBOX).arg("--list"))?;
    Ok(list.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
}

/// The newest `linux-image-6.12.N+deb12-cloud-amd64` the package lists know.
pub fn newest_kernel_package() -> Result<String> {
    let search = || -> Result<Vec<String>> {
        let out = run(Command::new("apt-cache").args([
            "search",
            "--names-only",
            r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$",
        ]))?;
        Ok(out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect())
    };
    let mut names = search()?;
    if names.is_empty() {
        run_fetching(Command::new("apt-get").arg("update").arg("-qq"))?;
        names = search()?;
    }
    names
        .into_iter()
        .max_by_key(|name| patch_level(name))
        .context("no linux-image-6.12.*+deb12-cloud-amd64 package is known to apt")
}

fn patch_level(package: &str) -> u32 {
    package
        .strip_prefix("linux-image-6.12.")
        .and_then(|rest| rest.split('+').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Downloads and unpacks the kernel package into `cache` once; later calls reuse it.
pub fn fetch_kernel(cache: &Path) -> Result<Kernel> {
    let package = newest_kernel_package()?;
    let dir = cache.join(&package);
    let ready = dir.join("ready");
    if !ready.exists() {
        unpack_kernel(&package, &dir)?;
        std::fs::write(&ready, b"")?;
    }
    let vmlinuz = dir.join("vmlinuz");
    let modules = MODULES
        .iter()
        .map(|(name, _)| dir.join("modules").join(format!("{name}.ko")))
        .filter(|path| path.exists())
        .collect();
    Ok(Kernel { package, vmlinuz, modules })
}

fn unpack_kernel(package: &str, dir: &Path) -> Result<()> {
    let download = dir.join("download");
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&download)?;
    std::fs::create_dir_all(dir.join("modules"))?;
    eprintln!("lab: downloading {package}");
    run_fetching(Command::new("apt-get").arg("download").arg(package).current_dir(&download))?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let boot = std::fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .context("the package has no boot/vmlinuz-*")?;
    std::fs::copy(&boot, dir.join("vmlinuz"))?;
    let all = find_files(&root.join("lib/modules"))?;
    for (name, required) in MODULES {
        let wanted = format!("{name}.ko.xz");
        match all.iter().find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == wanted)) {
            Some(path) => {
                let out = dir.join("modules").join(format!("{name}.ko"));
                let bytes = Command::new("xz").arg("-dc").arg(path).output()?;
                if !bytes.status.success() {
                    bail!("xz could not decompress {}", path.display());
                }
                std::fs::write(out, bytes.stdout)?;
            }
            None if *required => bail!("module {name} is not in {package}"),
            None => {}
        }
    }
    std::fs::remove_dir_all(&root)?;
    std::fs::remove_dir_all(&download)?;
    Ok(())
}

fn find_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_patch_level_wins() {
        let names =
            ["linux-image-6.12.9+deb12-cloud-amd64", "linux-image-6.12.117+deb12-cloud-amd64"];
        let newest = names.iter().max_by_key(|n| patch_level(n)).unwrap();
        assert_eq!(*newest, "linux-image-6.12.117+deb12-cloud-amd64");
    }
}
