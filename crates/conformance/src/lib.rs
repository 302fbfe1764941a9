//! A conformance suite for vsock stacks that pairs with the kernel's `vsock_test`
//! (`tools/testing/vsock`): every test of the 6.12 tool, the later mainline tests that apply
//! to a userspace stack and the io_uring cases, each written once as a client half and a
//! server half over one socket-family trait, so they run against:
//!
//! * the userspace stack on its in-process loopback ([`targets::loopback`]);
//! * the vhost-user device's native sockets, with the userspace guest driver as the guest
//!   ([`targets::DeviceTarget`]);
//! * the kernel's `AF_VSOCK`, inside a guest the project's VM lab boots ([`kernel`]);
//! * any of these against the kernel's C tool, one half each, over the same TCP control
//!   protocol.
//!
//! The pieces:
//!
//! * [`control`]: the TCP control channel: one connection, `\n`-terminated ASCII lines,
//!   decimal numbers, the per-test `NEXT` / `SKIP` barrier and the final `COMPLETED` barrier,
//!   a 10-second limit on every blocking step;
//! * [`list`]: the test list: the kernel 6.12 list first (ids 0-25, in its order, with its
//!   names), which both sides must walk in the same order for a pairing to line up;
//! * [`peer`]: the trait the cases are written against, implemented by [`stack`] and
//!   [`kernel`];
//! * [`cases`]: the tests;
//! * [`runner`]: one side over a control channel, or both sides in this process;
//! * [`report`]: the PASS / SKIP / FAIL table and the expected results per target.
//!
//! ```
//! use zerovsock_conformance::{report, runner, targets};
//!
//! let (client, server) = targets::loopback();
//! let results = runner::run_pair(&client, &server, 20000, &[0, 14], false);
//! print!("{}", report::table("loopback", &results));
//! assert!(results.iter().all(|r| r.status == runner::Status::Pass));
//! ```
//!
//! Nothing here opens a kernel vsock socket outside a lab guest: [`kernel::KernelPeer::new`]
//! refuses to.

#![forbid(unsafe_code)]

#[macro_use]
mod family;

pub mod cases;
pub mod control;
pub mod kernel;
pub mod list;
pub mod peer;
pub mod report;
pub mod runner;
pub mod stack;
pub mod targets;
