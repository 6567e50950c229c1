//! A full data volume: a small tmpfs the test mounts (root is needed, as on CI).
//! Enqueue answers RESOURCE_EXHAUSTED, dequeues and acks go on (they use the disk
//! reserve), nothing acknowledged is lost, and enqueues resume once acks free space.

use sluice_integration::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const QUEUE: &str = r#"
[[queue]]
name = "full"
partitions = 1
fsync = "always"
"#;

/// A tmpfs of `size`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "sluice-test"])
            .arg(at)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs at {} failed (this test needs root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn full_disk_refuses_enqueues_keeps_acks_and_resumes_when_freed() {
    let dir = tempfile::tempdir().unwrap();
    let vol = Tmpfs::mount(&dir.path().join("vol"), "3m");
    let mut b = Broker::start_with(
        dir.path(),
        QUEUE,
        0,
        vol.0.join("data"),
        &["--disk-reserve-bytes", "524288"],
    )
    .await;
    let mut c = b.client().await;
    let body = "x".repeat(1000);

    // Fill the volume down to the reserve.
    let mut acked = HashSet::new();
    let mut refused = None;
    for i in 0..10_000 {
        match enqueue(&mut c, "full", msg(&format!("{i:05}{body}"))).await {
            Ok(_) => {
                acked.insert(i);
            }
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let refused = refused.expect("a 3 MiB volume never filled up");
    println!(
        "acknowledged {} enqueues before the disk filled",
        acked.len()
    );
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("disk full"), "{refused:?}");
    assert!(acked.len() > 1000, "only {} messages fit", acked.len());
    // Still refused, and a refused request wrote nothing.
    let again = enqueue(&mut c, "full", msg("one more")).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::ResourceExhausted);
    assert_eq!(stats(&mut c, "full").await.ready, acked.len() as u64);

    // Reads and acks go on: every acknowledged message comes out once.
    let drained = drain(&mut c, "full", 300).await;
    let got: HashSet<usize> = drained
        .iter()
        .map(|m| body_str(m)[..5].parse().unwrap())
        .collect();
    assert_eq!(drained.len(), acked.len(), "each message exactly once");
    assert_eq!(got, acked, "acknowledged messages lost on a full disk");

    // Acked segments are deleted, and enqueues are taken again.
    eventually_within(
        "enqueues accepted after acks freed space",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            async move { enqueue(&mut c, "full", msg("after")).await.ok() }
        },
    )
    .await;

    // After a crash the settled messages stay settled and the new one is there.
    b.proc.kill();
    b.restart().await;
    let mut c = b.client().await;
    let rest: Vec<String> = drain(&mut c, "full", 300)
        .await
        .iter()
        .map(body_str)
        .collect();
    assert_eq!(rest, vec!["after".to_string()]);
}
