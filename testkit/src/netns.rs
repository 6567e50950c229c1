//! Network namespaces for tests: a private world (the test re-executed under
//! `unshare`, so nothing it sets up is seen outside or outlives it), a bridge in it,
//! and one namespace per process joined to the bridge by a veth pair whose link can
//! be cut and restored. Needs root (as CI runs); `ip` from iproute2.

use std::io;
use std::net::Ipv4Addr;
use std::process::Command;

/// Set in the re-executed test: it is inside its world.
const WORLD_ENV: &str = "SLUICE_NETNS_WORLD";

/// Runs a command; an error names it and carries its stderr.
pub fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let what = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{}: {}",
            what(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn ip(args: &[&str]) -> io::Result<String> {
    run("ip", args)
}

/// Whether this process is a test re-executed inside its own world.
pub fn in_world() -> bool {
    std::env::var_os(WORLD_ENV).is_some()
}

/// Runs the test `name` (of the current test binary) again in new network and mount
/// namespaces, and fails if it fails there. Call it first in the test; go on only
/// when [`in_world`] is true.
pub fn rerun_in_world(name: &str) {
    let exe = std::env::current_exe().expect("current exe");
    let status = Command::new("unshare")
        .args(["--net", "--mount", "--fork", "--propagation", "private"])
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(WORLD_ENV, "1")
        .status()
        .expect("run unshare");
    assert!(status.success(), "{name} failed in its world (see above)");
}

/// Loopback up, private `/run/netns` and `/etc/netns`, and a bridge with `addr`.
pub fn setup_world(bridge: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    ip(&["link", "set", "lo", "up"])?;
    for dir in ["/run/netns", "/etc/netns"] {
        std::fs::create_dir_all(dir)?;
        run("mount", &["-t", "tmpfs", "tmpfs", dir])?;
    }
    ip(&["link", "add", bridge, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", bridge])?;
    ip(&["link", "set", bridge, "up"])?;
    Ok(())
}

/// Creates namespace `name` with `addr` on `bridge` (host side of the pair: `veth`)
/// and a default route through `gateway`.
pub fn add_namespace(
    name: &str,
    veth: &str,
    addr: Ipv4Addr,
    prefix: u8,
    bridge: &str,
    gateway: Ipv4Addr,
) -> io::Result<()> {
    let _ = ip(&["netns", "del", name]);
    ip(&["netns", "add", name])?;
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name,
    ])?;
    ip(&["link", "set", veth, "master", bridge, "up"])?;
    ip(&[
        "-n",
        name,
        "addr",
        "add",
        &format!("{addr}/{prefix}"),
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
        &gateway.to_string(),
    ])?;
    Ok(())
}

/// Removes namespace `name` (its veth pair goes with it).
pub fn del_namespace(name: &str) {
    let _ = ip(&["netns", "del", name]);
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
}

/// Cuts a namespace off the bridge (its link goes down) or reconnects it.
pub fn set_link(veth: &str, up: bool) -> io::Result<()> {
    ip(&["link", "set", veth, if up { "up" } else { "down" }]).map(|_| ())
}

/// Drops (or, `cut` false, lets through again) everything namespace `ns` sends to
/// `to`: with the same done the other way, the two cannot talk, while both still
/// reach and are reached from the bridge (where the test runs).
pub fn blackhole(ns: &str, to: Ipv4Addr, cut: bool) -> io::Result<()> {
    let verb = if cut { "add" } else { "del" };
    ip(&["-n", ns, "route", verb, "blackhole", &format!("{to}/32")]).map(|_| ())
}
