//! The whole suite on the in-process targets, checked against the expectations checked in
//! for each (`expected/`): the loopback stack, and the device's native sockets against the
//! userspace guest driver in both roles.

use zerovsock_conformance::report::{checked_in, table, Expectations};
use zerovsock_conformance::runner::{cases_for, run_pair, Endpoint, TestResult};
use zerovsock_conformance::targets::{self, DeviceTarget};

fn every_id() -> Vec<usize> {
    (0..cases_for(false).len()).collect()
}

fn assert_as_expected(target: &str, title: &str, results: &[TestResult]) {
    print!("{}", table(title, results));
    let expected = Expectations::parse(checked_in(target).expect("checked in")).expect("parses");
    let unexpected = expected.unexpected(results);
    assert!(unexpected.is_empty(), "{title}: unexpected results:\n{}", unexpected.join("\n"));
}

#[test]
fn the_suite_on_loopback_is_as_expected() {
    let (client, server) = targets::loopback();
    let results = run_pair(&client, &server, 10_000, &every_id(), false);
    assert_as_expected("loopback", "loopback", &results);
}

fn device(
    client: impl Fn(&DeviceTarget) -> Endpoint,
    server: impl Fn(&DeviceTarget) -> Endpoint,
    title: &str,
    port: u32,
) {
    let target = DeviceTarget::start().expect("device and guest driver");
    let results = run_pair(&client(&target), &server(&target), port, &every_id(), false);
    assert_as_expected("device", title, &results);
}

#[test]
fn the_suite_with_the_guest_as_client_and_the_device_host_as_server_is_as_expected() {
    device(DeviceTarget::guest, DeviceTarget::host, "device: guest client, host server", 11_000);
}

#[test]
fn the_suite_with_the_device_host_as_client_and_the_guest_as_server_is_as_expected() {
    device(DeviceTarget::host, DeviceTarget::guest, "device: host client, guest server", 12_000);
}

/// The kernel family opens AF_VSOCK, which this machine must never do: outside a guest the
/// project's lab booted, it refuses before any socket exists.
#[test]
fn the_kernel_family_refuses_to_run_outside_a_lab_guest() {
    if zerovsock_lab::in_lab_guest() {
        return;
    }
    let refused = zerovsock_conformance::kernel::KernelPeer::new().expect_err("must refuse");
    assert!(refused.to_string().contains("refusing to open AF_VSOCK"), "{refused}");
}
