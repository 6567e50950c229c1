//! The `sluice` command against `sluice dev`, as a user runs it: send, receive in
//! batches with a summary, nack to the dead-letter queue, redrive in chunks, stats;
//! and a clear refusal of `--kube` where it means nothing.

use sluice_integration::*;
use std::process::Command;
use std::time::Duration;

/// Runs `sluice --addr <dev> args…`; returns (success, stdout, stderr).
fn sluice(dev: &Dev, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("sluice"))
        .arg("--addr")
        .arg(format!("http://{}", dev.addr))
        .args(args)
        .output()
        .expect("run sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dev: &Dev, args: &[&str]) -> (String, String) {
    let (success, out, err) = sluice(dev, args);
    assert!(success, "sluice {args:?}: {out}{err}");
    (out, err)
}

/// The value of `name:` in `sluice stats` output.
fn stat(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {out}"))
        .trim()
        .parse()
        .unwrap()
}

fn receipts(out: &str) -> Vec<String> {
    out.split_whitespace()
        .filter_map(|w| w.strip_prefix("receipt="))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn send_receive_dead_letter_and_redrive_from_the_command_line() {
    let dir = test_dir();
    let dev = Dev::start(dir.path()).await;
    // Keyless: a key's messages are delivered one at a time.
    for i in 0..150 {
        ok(&dev, &["send", "orders", &format!("order-{i}")]);
    }
    let (out, _) = ok(&dev, &["stats", "orders"]);
    assert_eq!(stat(&out, "ready"), 150, "{out}");

    // More than one Dequeue's worth, leased and left so: each printed once.
    let (out, err) = ok(
        &dev,
        &["receive", "orders", "--max", "1000", "--wait", "1s"],
    );
    let leased = receipts(&out);
    assert_eq!(leased.len(), 150, "{err}");
    assert!(err.contains("received 150 (leased"), "{err}");
    for i in [0, 100, 149] {
        assert!(out.contains(&format!("\norder-{i}\n")), "order-{i}");
    }

    // Dead-lettered by receipt, then moved back in chunks.
    let mut args = vec!["nack", "orders", "--dead-letter"];
    args.extend(leased.iter().map(String::as_str));
    ok(&dev, &args);
    // (Dead letters are copied to the dead-letter queue after the nack is answered.)
    eventually_within("150 dead letters", Duration::from_secs(30), || async {
        let (out, _) = ok(&dev, &["stats", "orders.dlq"]);
        (stat(&out, "ready") == 150).then_some(())
    })
    .await;
    let (out, _) = ok(&dev, &["redrive", "orders", "--max", "100"]);
    assert_eq!(
        out.trim(),
        "moved 100 messages from orders.dlq back to orders"
    );
    let (out, _) = ok(&dev, &["redrive", "orders"]);
    assert_eq!(
        out.trim(),
        "moved 50 messages from orders.dlq back to orders"
    );

    let (_, err) = ok(
        &dev,
        &[
            "receive", "orders", "--max", "1000", "--wait", "1s", "--ack",
        ],
    );
    assert!(err.contains("received 150, acked 150"), "{err}");
    let (out, _) = ok(&dev, &["stats", "orders"]);
    assert_eq!(stat(&out, "ready") + stat(&out, "in flight"), 0, "{out}");
    let (_, err) = ok(&dev, &["receive", "orders", "--wait", "100ms"]);
    assert!(err.contains("no message"), "{err}");

    let (success, _, err) = sluice(&dev, &["--kube", "dev"]);
    assert!(
        !success && err.contains("--kube is for a cluster's queue"),
        "{err}"
    );
}
