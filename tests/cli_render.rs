//! Black-box tests of `ferry render` on the examples and the seed's own
//! manifests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::process::Command;

fn ferry(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn summary_of_the_wordpress_example() {
    let (ok, out, err) = ferry(&["render", "-f", "examples/wordpress", "--what", "summary"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("default/wp-svc type=NodePort clusterIP=10.96.0.80"),
        "{out}"
    );
    assert!(out.contains("port http80 80/TCP -> 18080 nodePort=30088"), "{out}");
    assert!(out.contains("endpoint 127.0.0.11:18080 ready=true"), "{out}");
    assert!(out.contains("endpoint 127.0.0.12:18080 ready=true"), "{out}");
    assert!(out.contains("wp-ink controller=nginx.org/ingress-controller"), "{out}");
    assert!(out.contains("default/wp-ing class=wp-ink"), "{out}");
    assert!(
        out.contains("host wp.test path / (Prefix) -> service wp-svc:80"),
        "{out}"
    );
}

#[test]
fn summary_of_the_seed_manifests_as_written() {
    let (ok, out, err) = ferry(&[
        "render",
        "-f",
        "tests/fixtures/seed/wp-ing.yml",
        "-f",
        "tests/fixtures/seed/services.yml",
        "--what",
        "summary",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("default/wp-svc type=NodePort"), "{out}");
    assert!(out.contains("default/maria-svc type=ClusterIP"), "{out}");
    assert!(out.contains("(no endpoints)"), "{out}");
    assert!(out.contains("default/wp-ing class=wp-ink"), "{out}");
}

#[test]
fn a_broken_document_is_reported_and_the_rest_still_renders() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80, protocol: XTP}]}\n",
    )
    .unwrap();
    let (ok, out, err) = ferry(&["render", "-f", dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("default/ok"), "{out}");
    assert!(!out.contains("default/bad"), "{out}");
    assert!(
        err.contains("document 1") && err.contains("Service default/bad: field spec.ports[0].protocol"),
        "{err}"
    );
}

#[test]
fn a_missing_path_is_an_error() {
    let (ok, _, err) = ferry(&["render", "-f", "/nonexistent/ferry-manifests"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/ferry-manifests"), "{err}");
}
