//! `deploy/README.md` explains every deployment file and the shutdown timing.

mod deploy_support;

use deploy_support::{Problems, deploy_dir, read};

#[test]
fn readme_explains_every_deploy_file() {
    let readme = read(&deploy_dir().join("README.md"));
    let mut p = Problems::default();
    for needle in [
        "docker build -f deploy/Dockerfile",
        "docker compose -f deploy/compose.yaml",
        "kubectl apply -k deploy/kubernetes/sidecar",
        "kubectl apply -k deploy/kubernetes/standalone",
        "grafana-dashboard.json",
        "alerts.yaml",
        "shutdown_grace",
        "terminationGracePeriodSeconds",
    ] {
        p.check(readme.contains(needle), || {
            format!("deploy/README.md does not mention {needle}")
        });
    }
    p.assert_none("deploy/README.md");
}
