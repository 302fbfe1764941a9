//! The kernel's own C test tools (tools/testing/vsock), built statically for the guests from
//! Debian's `linux-source-6.12` package: `vsock_test`, so the conformance suite can be paired
//! with it, and `vsock_perf`, so `zerovsock perf` can be.
//!
//! The build is cached under the lab's cache as `vsock_test-<package version>/`, one executable
//! per tool with the tools' sources beside them in `src/`, and redone only when an executable
//! is missing (a new package version gets a new directory). A tool added to a cache built
//! before it is compiled from the kept sources, without fetching the package again. What the
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
/// One of the C tools: its executable's name and its C files (its rule in
/// tools/testing/vsock/Makefile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub name: &'static str,
    pub sources: &'static [&'static str],
}

/// The conformance tests.
pub const VSOCK_TEST: Tool = Tool {
    name: "vsock_test",
    sources: &[
        "vsock_test.c",
        "vsock_test_zerocopy.c",
        "timeout.c",
        "control.c",
        "util.c",
        "msg_zerocopy_common.c",
    ],
};

/// The throughput tool (no control channel; the C library's and the kernel's UAPI headers
/// only).
pub const VSOCK_PERF: Tool =
    Tool { name: "vsock_perf", sources: &["vsock_perf.c", "msg_zerocopy_common.c"] };

/// Every tool the lab builds.
pub const TOOLS: [Tool; 2] = [VSOCK_TEST, VSOCK_PERF];

/// A built C tool.
#[derive(Debug, Clone)]
pub struct CTool {
    /// The `linux-source-6.12` package version it was built from, e.g. `6.12.118-1~deb12u1`.
    pub version: String,
    /// The static executable.
    pub path: PathBuf,
}

/// Returns the kernel's `tool` built from the newest `linux-source-6.12` apt knows, building
/// it into `cache` first when it is not there yet.
pub fn built(cache: &Path, tool: Tool) -> Result<CTool> {
    let version = source_version()?;
    let dir = cache_dir(cache, &version);
    let path = dir.join(tool.name);
    if !path.exists() {
        let context =
            || format!("building the kernel's {} from {SOURCE_PACKAGE} {version}", tool.name);
        if dir.join("src").join(tool.sources[0]).exists() {
            build_from_kept_sources(tool, &dir).with_context(context)?;
        } else {
            build(&version, &dir).with_context(context)?;
        }
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

/// The `gcc` arguments that build `tool` statically as `out`, run inside tools/testing/vsock
/// of the tree at `tree` (or a copy of that directory, with `tree` `None`: without the tree's
/// tools/include, which only `vsock_test` needs).
pub fn gcc_args(tool: Tool, tree: Option<&Path>, out: &Path) -> Vec<String> {
    let mut args: Vec<String> =
        ["-O2", "-static", "-D_GNU_SOURCE", "-Wall", "-Wno-pointer-sign", "-I."]
            .map(str::to_owned)
            .into();
    if let Some(tree) = tree {
        args.push(format!("-I{}", tree.join("tools/include").display()));
    }
    args.push("-o".to_owned());
    args.push(out.display().to_string());
    args.extend(tool.sources.iter().map(|s| (*s).to_owned()));
    args
}

/// Compiles `tool` into `dir` from `src` of `dir` (`tools/testing/vsock` as kept there).
fn build_from_kept_sources(tool: Tool, dir: &Path) -> Result<()> {
    ensure_build_tools()?;
    let partial = dir.join(format!("{}.partial", tool.name));
    run(Command::new("gcc").args(gcc_args(tool, None, &partial)).current_dir(dir.join("src")))?;
    std::fs::rename(&partial, dir.join(tool.name))?;
    eprintln!("lab: built {} from the kept sources", dir.join(tool.name).display());
    Ok(())
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
    let mut partials = Vec::new();
    for tool in TOOLS {
        let partial = dir.join(format!("{}.partial", tool.name));
        run(Command::new("gcc")
            .args(gcc_args(tool, Some(&tree), &partial))
            .current_dir(tree.join("tools/testing/vsock")))?;
        partials.push((tool, partial));
    }
    // The tools' sources stay beside them (a few hundred KiB), to read what a test does.
    let _ = std::fs::remove_dir_all(dir.join("src"));
    std::fs::rename(tree.join("tools/testing/vsock"), dir.join("src"))?;
    for (tool, partial) in partials {
        std::fs::rename(&partial, dir.join(tool.name))?;
        eprintln!("lab: built {}", dir.join(tool.name).display());
    }
    std::fs::write(dir.join("version"), format!("{SOURCE_PACKAGE} {version}\n"))?;
    std::fs::remove_dir_all(&work)?;
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
        let tree = Path::new("/w/linux-source-6.12");
        let args = gcc_args(VSOCK_TEST, Some(tree), Path::new("/out/vsock_test"));
        assert!(args.contains(&"-static".to_owned()));
        assert!(args.contains(&"-I/w/linux-source-6.12/tools/include".to_owned()));
        let out = args.iter().position(|a| a == "-o").unwrap();
        assert_eq!(args[out + 1], "/out/vsock_test");
        let sources: Vec<&String> = args.iter().filter(|a| a.ends_with(".c")).collect();
        assert_eq!(sources.len(), VSOCK_TEST.sources.len());
        assert!(sources.iter().any(|s| *s == "vsock_test_zerocopy.c"));
    }

    #[test]
    fn vsock_perf_is_its_makefile_rule_and_builds_without_the_tree() {
        let args = gcc_args(VSOCK_PERF, None, Path::new("/c/vsock_perf.partial"));
        assert!(args.contains(&"-static".to_owned()));
        assert!(!args.iter().any(|a| a.contains("tools/include")), "{args:?}");
        let sources: Vec<&String> = args.iter().filter(|a| a.ends_with(".c")).collect();
        assert_eq!(sources, ["vsock_perf.c", "msg_zerocopy_common.c"]);
        assert!(TOOLS.iter().all(|t| t.sources.contains(&"msg_zerocopy_common.c")));
    }
}
