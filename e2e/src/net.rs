//! Pod networking inside the e2e world: a bridge, and one network namespace per pod
//! joined to it by a veth pair. Everything here runs inside the network and mount
//! namespaces the test created (see `world`), so names only need to be unique there.

use crate::error::{Error, Result};
use sluice_testkit::netns;
use std::net::Ipv4Addr;

/// The bridge all pods hang off, and its address (the "node IP": API server, DNS).
pub const BRIDGE: &str = "sluice0";
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const PREFIX: u8 = 16;
/// The pods' addresses, behind the bridge.
pub const POD_CIDR: &str = "10.244.0.0/16";

/// A failed command, as the e2e error.
fn failed(e: std::io::Error) -> Error {
    Error::Command {
        cmd: "ip".into(),
        detail: e.to_string(),
    }
}

pub fn ip(args: &[&str]) -> Result<String> {
    netns::ip(args).map_err(failed)
}

/// Loopback up, private /run/netns and /etc/netns, the bridge with the node IP.
pub fn setup_world() -> Result<()> {
    netns::setup_world(BRIDGE, BRIDGE_IP, PREFIX).map_err(failed)
}

/// Creates netns `name` with address `addr` on the bridge (host side `veth`),
/// and its resolv.conf pointing at the cluster DNS server.
pub fn add_pod(name: &str, veth: &str, addr: Ipv4Addr, namespace: &str) -> Result<()> {
    netns::add_namespace(name, veth, addr, PREFIX, BRIDGE, BRIDGE_IP).map_err(failed)?;
    let dir = format!("/etc/netns/{name}");
    std::fs::create_dir_all(&dir).map_err(crate::error::io_at(&dir))?;
    let resolv = format!(
        "nameserver {BRIDGE_IP}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:1 attempts:3\n"
    );
    std::fs::write(format!("{dir}/resolv.conf"), resolv).map_err(crate::error::io_at(&dir))?;
    Ok(())
}

/// Removes a pod's netns (its veth pair goes with it).
pub fn del_pod(name: &str) {
    netns::del_namespace(name);
}

/// Cuts a pod off the network (its link goes down) or reconnects it.
pub fn set_link(veth: &str, up: bool) -> Result<()> {
    netns::set_link(veth, up).map_err(failed)
}
