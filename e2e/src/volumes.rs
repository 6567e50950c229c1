//! The e2e worlds' volume provisioner: what a local-path provisioner and an
//! external resizer do on a one-node cluster. Every pending claim gets a
//! PersistentVolume backed by a directory (`hostPath`, pre-bound to the claim);
//! a volume whose claim is gone is removed with its directory; a claim that asks
//! for more gets it. The node agent runs it beside its pods, and a world with a
//! real kubelet runs it on its own (the kubelet mounts the directories).

use crate::error::{Result, io_at};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The label on the volumes it made: the node (provisioner) that made them.
pub const PROVISIONED_LABEL: &str = "e2e.sluice.dev/provisioned-by";

/// Runs [`provision`] every half second until the handle is aborted.
pub fn spawn(client: Client, node: String, dir: PathBuf) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = provision(&client, &node, &dir).await {
                tracing::warn!(error = %e, "volume provisioner");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Binds every pending claim to a new directory-backed PV, grows the PVs it made
/// whose claim asks for more ([`resize`]), and removes the PVs (and directories) it
/// made once their claim is gone.
pub async fn provision(client: &Client, node: &str, dir: &Path) -> Result<()> {
    let pvcs: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let ours = ListParams::default().labels(&format!("{PROVISIONED_LABEL}={node}"));
    let existing = pvs.list(&ours).await?;
    for pv in &existing.items {
        let phase = pv
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Released" || phase == "Failed" {
            let path = dir.join(pv.name_any());
            tracing::info!(pv = %pv.name_any(), "claim gone: removing volume");
            let _ = std::fs::remove_dir_all(&path);
            match pvs.delete(&pv.name_any(), &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    resize(client, &existing.items).await?;
    let have: HashSet<String> = existing.items.iter().map(|p| p.name_any()).collect();
    for pvc in pvcs.list(&ListParams::default()).await?.items {
        let spec = pvc.spec.clone().unwrap_or_default();
        let phase = pvc
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if spec.volume_name.is_some()
            || phase != "Pending"
            || pvc.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let uid = pvc.uid().unwrap_or_default();
        let name = format!("pv-{}", &uid[..uid.len().min(13)]);
        if have.contains(&name) {
            continue;
        }
        let path = dir.join(&name);
        std::fs::create_dir_all(&path).map_err(io_at(&path))?;
        // Writable by any user, as local-path-provisioner makes them: a kubelet
        // applies no fsGroup to hostPath volumes, and the brokers run as 65532.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
            .map_err(io_at(&path))?;
        let size = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| "1Gi".into());
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {PROVISIONED_LABEL: node}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
                "hostPath": {"path": path.to_string_lossy(), "type": "Directory"},
                "claimRef": {"namespace": pvc.namespace(), "name": pvc.name_any(), "uid": uid},
            }
        }))?;
        tracing::info!(pv = %name, claim = %pvc.name_any(), "provisioning volume");
        match pvs.create(&PostParams::default(), &pv).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What an external resizer and the kubelet do together for a claim whose request
/// grew past its volume (the API server let it through: the claim is bound and its
/// StorageClass allows expansion): the PV's capacity, then the claim's, take the
/// new size. A directory has no size of its own, so nothing else changes.
async fn resize(client: &Client, ours: &[PersistentVolume]) -> Result<()> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let storage =
        |q: Option<&BTreeMap<String, Quantity>>| q.and_then(|m| m.get("storage")).cloned();
    for pv in ours {
        let Some(claim) = pv.spec.as_ref().and_then(|s| s.claim_ref.clone()) else {
            continue;
        };
        let (Some(ns), Some(name)) = (claim.namespace, claim.name) else {
            continue;
        };
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let Some(pvc) = pvcs.get_opt(&name).await? else {
            continue;
        };
        if pvc.uid() != claim.uid {
            continue;
        }
        let asked = storage(
            pvc.spec
                .as_ref()
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref()),
        );
        let has = storage(pv.spec.as_ref().and_then(|s| s.capacity.as_ref()));
        let shown = storage(pvc.status.as_ref().and_then(|s| s.capacity.as_ref()));
        let Some(asked) = asked else { continue };
        if has.as_ref() != Some(&asked) {
            tracing::info!(pv = %pv.name_any(), claim = %name, size = %asked.0, "growing volume");
            pvs.patch(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"capacity": {"storage": asked}}})),
            )
            .await?;
        }
        if shown.as_ref() != Some(&asked)
            && pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        {
            pvcs.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"capacity": {"storage": asked}}})),
            )
            .await?;
        }
    }
    Ok(())
}
