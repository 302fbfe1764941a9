//! The kernel's own C `vsock_test` (tools/testing/vsock), built statically for the guests from
//! Debian's `linux-source-6.12` package, so the conformance suite can be paired with it.
//!
//! The build is cached under the lab's cache as `vsock_test-<package version>/vsock_test`, its
//! sources beside it in `src/`, and redone only when the executable is missing (a new package version gets a new directory). What the
//! build needs on the host (gcc, the C library's headers and static archive, xz for the source
//! tarball) is installed with apt-get when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup::{apt_install, have, installed, run, run_fetching};

/// The Debian package with the kernel's source.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// The source tree's top directory inside the package's tarball.
const TREE: &str = "linux-source-6.12";
/// The only parts of the tree the tool needs: its sources and the tools' headers.
pub const MEMBERS: [&str; 2] = ["tools/testing/vsock", "tools/include"];
/// The tool's C files (`vsock_test`'s rule in tools/testing/vsock/Makefile).
pub const SOURCES: [&str; 6] = [
    "vsock_test.c",
    "vsock_test_zerocopy.c",
    "timeout.c",
    "control.c",
    "util.c",
    "msg_zerocopy_common.c",
];

/// A built C `vsock_test`.
#[derive(Debug, Clone)]
pub struct CTool {
    /// The `linux-source-6.12` package version it was built from, e.g. `6.12.118-1~deb12u1`.
    pub version: String,
    /// The static executable.
    pub path: PathBuf,
}

/// Returns the kernel's `vsock_test` built from the newest `linux-source-6.12` apt knows,
/// building it into `cache` first when it is not there yet.
pub fn vsock_test(cache: &Path) -> Result<CTool> {
    let version = source_version()?;
    let dir = cache_dir(cache, &version);
    let path = dir.join("vsock_test");
    if !path.exists() {
        build(&version, &dir).with_context(|| {
            format!("building the kernel's vsock_test from {SOURCE_PACKAGE} {version}")
        })?;
    }
    Ok(CTool { version, path })
}

/// Where the tool built from `version` lives.
pub fn cache_dir(cache: &Path, version: &str) -> PathBuf {
    // Debian versions may hold ':' (an epoch), which is awkward in a path.
    cache.join(format!("vsock_test-{}", version.replace(':', "_")))
}

/// The candidate version of [`SOURCE_PACKAGE`], updating apt's lists once if it does not know
/// the package.
fn source_version() -> Result<String> {
    let policy = || run(Command::new("apt-cache").args(["policy", SOURCE_PACKAGE]));
    if let Some(version) = candidate(&policy()?) {
        return Ok(version);
    }
    run_fetching(Command::new("apt-get").arg("update").arg("-qq"))?;
    candidate(&policy()?).with_context(|| format!("apt knows no {SOURCE_PACKAGE}"))
}

/// The `Candidate:` of `apt-cache policy` output, if there is one.
pub fn candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|version| !version.is_empty() && *version != "(none)")
        .map(str::to_owned)
}

/// Installs gcc, the C library's development files and xz when missing.
pub fn ensure_build_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !have("gcc") {
        missing.push("gcc");
    }
    if !installed("libc6-dev") {
        missing.push("libc6-dev");
    }
    if !installed("linux-libc-dev") {
        missing.push("linux-libc-dev");
    }
    if !have("xz") {
        missing.push("xz-utils");
    }
    apt_install(&missing)
}

/// The `tar` arguments that extract only [`MEMBERS`] of `tarball` into `into`.
pub fn extract_args(tarball: &Path, into: &Path) -> Vec<String> {
    let mut args = vec![
        "-xJf".to_owned(),
        tarball.display().to_string(),
        "-C".to_owned(),
        into.display().to_string(),
    ];
    args.extend(MEMBERS.iter().map(|member| format!("{TREE}/{member}")));
    args
}

/// The `gcc` arguments that build the static tool `out`, run inside tools/testing/vsock of the
/// tree at `tree`.
pub fn gcc_args(tree: &Path, out: &Path) -> Vec<String> {
    let mut args: Vec<String> =
        ["-O2", "-static", "-D_GNU_SOURCE", "-Wall", "-Wno-pointer-sign", "-I."]
            .map(str::to_owned)
            .into();
    args.push(format!("-I{}", tree.join("tools/include").display()));
    args.push("-o".to_owned());
    args.push(out.display().to_string());
    args.extend(SOURCES.map(str::to_owned));
    args
}

fn build(version: &str, dir: &Path) -> Result<()> {
    ensure_build_tools()?;
    let work = dir.join("build");
    let _ = std::fs::remove_dir_all(&work);
    let download = work.join("download");
    std::fs::create_dir_all(&download)?;
    eprintln!("lab: downloading {SOURCE_PACKAGE} {version} to build the kernel's vsock_test");
    run_fetching(
        Command::new("apt-get")
            .arg("download")
            .arg(format!("{SOURCE_PACKAGE}={version}"))
            .current_dir(&download),
    )?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_file(&deb)?;
    let tarball = root.join(format!("usr/src/{TREE}.tar.xz"));
    if !tarball.exists() {
        bail!("{SOURCE_PACKAGE} has no usr/src/{TREE}.tar.xz");
    }
    eprintln!("lab: extracting {}", MEMBERS.join(" and "));
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    run(Command::new("tar").args(extract_args(&tarball, &src)))?;
    let tree = src.join(TREE);
    let partial = dir.join("vsock_test.partial");
    run(Command::new("gcc")
        .args(gcc_args(&tree, &partial))
        .current_dir(tree.join("tools/testing/vsock")))?;
    // The tool's sources stay beside it (a few hundred KiB), to read what a test does.
    let _ = std::fs::remove_dir_all(dir.join("src"));
    std::fs::rename(tree.join("tools/testing/vsock"), dir.join("src"))?;
    std::fs::rename(&partial, dir.join("vsock_test"))?;
    std::fs::write(dir.join("version"), format!("{SOURCE_PACKAGE} {version}\n"))?;
    std::fs::remove_dir_all(&work)?;
    eprintln!("lab: built {}", dir.join("vsock_test").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidate_version_comes_from_apt_cache_policy() {
        let policy = "linux-source-6.12:\n  Installed: (none)\n  Candidate: 6.12.118-1~deb12u1\n  \
                      Version table:\n     6.12.118-1~deb12u1 500\n";
        assert_eq!(candidate(policy).as_deref(), Some("6.12.118-1~deb12u1"));
        assert_eq!(
            candidate("linux-source-6.12:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(candidate(""), None, "a package apt does not know prints nothing");
    }

    #[test]
    fn each_version_has_its_own_cache_directory() {
        let cache = Path::new("/c");
        assert_eq!(
            cache_dir(cache, "6.12.118-1~deb12u1"),
            Path::new("/c/vsock_test-6.12.118-1~deb12u1")
        );
        assert_eq!(cache_dir(cache, "1:6.12.9-1"), Path::new("/c/vsock_test-1_6.12.9-1"));
    }

    #[test]
    fn only_the_tool_and_the_tools_headers_are_extracted() {
        let args = extract_args(Path::new("/s/linux-source-6.12.tar.xz"), Path::new("/w"));
        assert_eq!(
            args,
            [
                "-xJf",
                "/s/linux-source-6.12.tar.xz",
                "-C",
                "/w",
                "linux-source-6.12/tools/testing/vsock",
                "linux-source-6.12/tools/include"
            ]
        );
    }

    #[test]
    fn the_build_is_static_and_names_every_source_once() {
        let args = gcc_args(Path::new("/w/linux-source-6.12"), Path::new("/out/vsock_test"));
        assert!(args.contains(&"-static".to_owned()));
        assert!(args.contains(&"-I/w/linux-source-6.12/tools/include".to_owned()));
        let out = args.iter().position(|a| a == "-o").unwrap();
        assert_eq!(args[out + 1], "/out/vsock_test");
        let sources: Vec<&String> = args.iter().filter(|a| a.ends_with(".c")).collect();
        assert_eq!(sources.len(), SOURCES.len());
        assert!(sources.iter().any(|s| *s == "vsock_test_zerocopy.c"));
    }
}
