//! Pod networking inside the e2e world: a bridge, and one network namespace per pod
//! joined to it by a veth pair. Everything here runs inside the network and mount
//! namespaces the test created (see `world`), so names only need to be unique there.

use crate::error::{Error, Result};
use std::net::Ipv4Addr;
use std::process::Command;

/// The bridge all pods hang off, and its address (the "node IP": API server, DNS).
pub const BRIDGE: &str = "sluice0";
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const PREFIX: u8 = 16;

/// Runs a command; an error names it and carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Command {
            cmd: format!("{program} {}", args.join(" ")),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("{program} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// Loopback up, private /run/netns and /etc/netns, the bridge with the node IP.
pub fn setup_world() -> Result<()> {
    ip(&["link", "set", "lo", "up"])?;
    for dir in ["/run/netns", "/etc/netns"] {
        std::fs::create_dir_all(dir).map_err(crate::error::io_at(dir))?;
        run("mount", &["-t", "tmpfs", "tmpfs", dir])?;
    }
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&[
        "addr",
        "add",
        &format!("{BRIDGE_IP}/{PREFIX}"),
        "dev",
        BRIDGE,
    ])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Creates netns `name` with address `addr` on the bridge (host side `veth`),
/// and its resolv.conf pointing at the cluster DNS server.
pub fn add_pod(name: &str, veth: &str, addr: Ipv4Addr, namespace: &str) -> Result<()> {
    let _ = ip(&["netns", "del", name]);
    ip(&["netns", "add", name])?;
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name,
    ])?;
    ip(&["link", "set", veth, "master", BRIDGE, "up"])?;
    ip(&[
        "-n",
        name,
        "addr",
        "add",
        &format!("{addr}/{PREFIX}"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", name, "link", "set", "eth0", "up"])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        name,
        "route",
        "add",
        "default",
        "via",
        &BRIDGE_IP.to_string(),
    ])?;
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
    let _ = ip(&["netns", "del", name]);
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
}

/// Cuts a pod off the network (its link goes down) or reconnects it.
pub fn set_link(veth: &str, up: bool) -> Result<()> {
    ip(&["link", "set", veth, if up { "up" } else { "down" }]).map(|_| ())
}
