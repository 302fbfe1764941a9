//! Conformance with the kernel's `vsock_test` (`tools/testing/vsock`), the pieces both halves
//! of a pairing must agree on byte for byte:
//!
//! * [`control`]: the TCP control channel: one connection, `\n`-terminated ASCII lines,
//!   decimal numbers, the per-test `NEXT` / `SKIP` barrier and the final `COMPLETED` barrier,
//!   a 10-second limit on every blocking step;
//! * [`list`]: the kernel 6.12 test list (ids 0-25, in its order, with its names), which
//!   both sides must run in the same order for a pairing to line up.
//!
//! Nothing here opens a vsock socket: the control channel is TCP, as in the kernel tool.

#![forbid(unsafe_code)]

pub mod control;
pub mod list;
