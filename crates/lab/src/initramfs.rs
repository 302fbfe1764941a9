//! The guest's initramfs, written as a `newc` cpio archive (what the kernel unpacks), with
//! busybox, the vsock modules, the project's binaries, and an `/init` that runs one script.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The file whose presence, together with `zerovsock.lab=1` on the kernel command line, tells
/// a test it runs inside the project's guest.
pub const GUEST_MARKER: &str = "/zerovsock-lab-guest";
/// Kernel command-line flag set on every lab guest.
pub const GUEST_CMDLINE_FLAG: &str = "zerovsock.lab=1";
/// Printed by `/init` before the script runs.
pub const BEGIN_MARK: &str = "ZEROVSOCK-LAB-BEGIN";
/// Printed by `/init` after the script, followed by its exit status.
pub const EXIT_MARK: &str = "ZEROVSOCK-LAB-EXIT";

/// A `newc` cpio archive being built in memory.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    inode: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let name = name.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    /// Adds a directory and its parents (once each).
    pub fn dir(&mut self, path: &str) {
        let mut so_far = String::new();
        for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            so_far.push('/');
            so_far.push_str(part);
            if self.dirs.insert(so_far.clone()) {
                let name = so_far.clone();
                self.entry(&name, 0o040_755, &[]);
            }
        }
    }

    /// Adds a file with `mode` permission bits, creating its directory.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100_000 | mode, data);
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o120_777, target.as_bytes());
    }

    /// Finishes the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// What goes into a guest image.
pub struct Image<'a> {
    /// Static busybox binary on the host.
    pub busybox: &'a Path,
    /// Applets to link to busybox (from `busybox --list`).
    pub applets: &'a [String],
    /// Kernel modules to load at boot, in order (already decompressed).
    pub modules: &'a [PathBuf],
    /// Host files copied to `/bin/<file name>`.
    pub binaries: &'a [PathBuf],
    /// The script `/init` runs.
    pub script: &'a str,
}

fn init_script(modules: &[PathBuf]) -> String {
    let mut init = String::from(
        "#!/bin/sh\n\
         export PATH=/bin\n\
         mkdir -p /proc /sys /dev /tmp /run\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n",
    );
    for module in modules {
        let name = module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        init.push_str(&format!("insmod /lib/modules/{name} || echo \"insmod {name} failed\"\n"));
    }
    init.push_str(&format!(
        "ip link set lo up 2>/dev/null\n\
         echo {BEGIN_MARK}\n\
         cd /tmp\n\
         sh /run.sh\n\
         echo \"{EXIT_MARK} $?\"\n\
         poweroff -f\n"
    ));
    init
}

/// Builds the archive for `image`.
pub fn build(image: &Image<'_>) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["/bin", "/lib/modules", "/proc", "/sys", "/dev", "/tmp", "/run", "/etc"] {
        cpio.dir(dir);
    }
    let busybox = std::fs::read(image.busybox)
        .with_context(|| format!("reading {}", image.busybox.display()))?;
    cpio.file("/bin/busybox", 0o755, &busybox);
    for applet in image.applets {
        // `busybox --list` names busybox itself; a link over the binary would loop.
        if applet != "busybox" && !applet.contains('/') {
            cpio.symlink(&format!("/bin/{applet}"), "busybox");
        }
    }
    for module in image.modules {
        let data =
            std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
        let name = module.file_name().context("module path has no file name")?.to_string_lossy();
        cpio.file(&format!("/lib/modules/{name}"), 0o644, &data);
    }
    for binary in image.binaries {
        let data =
            std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
        let name = binary.file_name().context("binary path has no file name")?.to_string_lossy();
        cpio.file(&format!("/bin/{name}"), 0o755, &data);
    }
    cpio.file("/init", 0o755, init_script(image.modules).as_bytes());
    cpio.file("/run.sh", 0o755, image.script.as_bytes());
    cpio.file(GUEST_MARKER, 0o644, b"this is a zerovsock lab guest\n");
    Ok(cpio.finish())
}

/// Writes `bytes` to `path` atomically enough for a cache (write, then rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("partial");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_field(archive: &[u8], entry_start: usize, index: usize) -> u32 {
        let at = entry_start + 6 + index * 8;
        let text = std::str::from_utf8(&archive[at..at + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    #[test]
    fn entries_are_newc_and_four_byte_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("/a/b.txt", 0o644, b"hello");
        let archive = cpio.finish();
        assert!(archive.starts_with(b"070701"));
        assert_eq!(archive.len() % 4, 0);
        // First entry is the directory /a, then the file.
        assert_eq!(header_field(&archive, 0, 1), 0o040_755);
        let second = archive.windows(6).skip(1).position(|w| w == b"070701").unwrap() + 1;
        assert_eq!(header_field(&archive, second, 1), 0o100_644);
        assert_eq!(header_field(&archive, second, 6), 5, "file size");
        assert!(archive.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn parents_are_created_once() {
        let mut cpio = Cpio::default();
        cpio.file("/x/y/1", 0o644, b"");
        cpio.file("/x/y/2", 0o644, b"");
        let archive = cpio.finish();
        let count = archive.windows(3).filter(|w| w == b"x/y").count();
        assert_eq!(count, 3, "one directory entry and two file names");
    }

    #[test]
    fn init_loads_modules_in_order_and_reports_the_exit_status() {
        let init =
            init_script(&[PathBuf::from("/c/vsock.ko"), PathBuf::from("/c/vsock_loopback.ko")]);
        let first = init.find("vsock.ko").unwrap();
        let second = init.find("vsock_loopback.ko").unwrap();
        assert!(first < second);
        assert!(init.contains(EXIT_MARK) && init.contains("poweroff -f"));
    }
}
