//! `zerovsock vhost`: the vhost-user-vsock device, with vhost-device-vsock's flags.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use zerovsock_vhost::{Device, DeviceConfig};

/// Flags as vhost-device-vsock spells them.
#[derive(Args, Debug)]
pub struct VhostArgs {
    /// The guest's CID (3 or more).
    #[arg(long, default_value_t = 3)]
    guest_cid: u32,
    /// The vhost-user socket the VMM (QEMU `-chardev socket,path=...`) connects to.
    #[arg(long)]
    socket: PathBuf,
    /// Hybrid Unix-socket endpoints: host programs connect here and write `CONNECT <port>`;
    /// guest connects to host port P reach `<uds-path>_P`.
    #[arg(long)]
    uds_path: PathBuf,
    /// The largest virtqueue the VMM may set up (a power of two).
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
}

pub fn run(args: VhostArgs) -> anyhow::Result<()> {
    if args.socket == args.uds_path {
        bail!("--socket and --uds-path must differ ({})", args.socket.display());
    }
    let mut config = DeviceConfig::new(args.guest_cid);
    config.uds_path = Some(args.uds_path.clone());
    config.queue_size = args.queue_size;
    let device = Device::new(config)
        .with_context(|| format!("starting the device at {}", args.uds_path.display()))?;
    eprintln!(
        "zerovsock vhost: guest CID {}, vhost-user socket {}, Unix endpoints {}",
        args.guest_cid,
        args.socket.display(),
        args.uds_path.display()
    );
    device.serve(&args.socket).with_context(|| format!("serving {}", args.socket.display()))
}
