//! crds/ and the chart's crds/ hold exactly what the Rust types generate.
//! Regenerate with `scripts/k8s/gen-crds.sh`.

use std::path::Path;

#[test]
fn generated_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let want = format!("{}\n", sluice_operator::crd::crd_yaml().trim_end());
    for rel in [
        "crds/queues.sluice.dev.yaml",
        "charts/sluice/crds/queues.sluice.dev.yaml",
    ] {
        let got = std::fs::read_to_string(root.join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}; run scripts/k8s/gen-crds.sh"));
        assert!(
            got == want,
            "{rel} drifted from operator/src/crd.rs; run scripts/k8s/gen-crds.sh"
        );
    }
}

#[test]
fn crd_has_the_agreed_shape() {
    use kube::CustomResourceExt;
    let crd = sluice_operator::crd::Queue::crd();
    let v = serde_json::to_value(&crd).unwrap();
    assert_eq!(v["metadata"]["name"], "queues.sluice.dev");
    assert_eq!(v["spec"]["scope"], "Namespaced");
    assert_eq!(v["spec"]["names"]["shortNames"][0], "slq");
    let ver = &v["spec"]["versions"][0];
    assert_eq!(ver["name"], "v1alpha1");
    assert!(ver["subresources"]["status"].is_object());
    let spec = &ver["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for field in [
        "replicas",
        "partitions",
        "storage",
        "durability",
        "delivery",
        "retention",
        "maxMessageBytes",
        "deduplicationWindow",
        "access",
        "deletionPolicy",
        "template",
    ] {
        let d = spec["properties"][field]["description"]
            .as_str()
            .unwrap_or("");
        assert!(
            !d.is_empty(),
            "spec.{field} has no description for kubectl explain"
        );
    }
    let cols: Vec<&str> = ver["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in ["Replicas", "Ready", "Status", "Age"] {
        assert!(cols.contains(&c), "printer column {c}");
    }
}
