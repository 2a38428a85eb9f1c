//! Every kustomize directory under `deploy/kubernetes/` against the real binary.
//!
//! Each is rendered with `kubectl kustomize` (kubectl must be installed; `.ci/run` installs
//! it when missing). For every `send-gateway` container, the container's `args`, with the
//! ConfigMap's file in place of the mounted path and the manifest's environment (Secret values
//! taken from the directory's `secret.example.yaml`), must pass `send-gateway check-config`;
//! the declared ports, probes, grace period, Services, PodDisruptionBudgets and autoscalers
//! must match the configuration that run validated.

mod deploy_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use deploy_support::{
    Effective, Image, OTHER_ENV, Problems, arr_at, assert_env_layer_is_live, check_config,
    config_arg, deploy_dir, describe, dockerfile, effective, host_port, quantity_bytes, read,
    resolve_config_env, str_at, strings, with_config_path, yaml_docs,
};
use gateway::config::StoreBackend;
use serde_json::Value;

/// Peak RSS relaying 8 concurrent 20 MB sends is about 40 MiB (BENCHMARKS.md).
const MIN_MEMORY_LIMIT: u64 = 64 * 1024 * 1024;

fn kubectl() -> String {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    let hint = "these tests render deploy/kubernetes/* with `kubectl kustomize`: install \
                kubectl (Debian: `apt-get install kubernetes-client`; `.ci/run` installs it \
                when missing) or point KUBECTL at one";
    match Command::new(&kubectl)
        .args(["version", "--client"])
        .output()
    {
        Ok(out) if out.status.success() => kubectl,
        Ok(out) => panic!(
            "`{kubectl} version --client` failed ({}): {hint}",
            describe(&out)
        ),
        Err(e) => panic!("kubectl is not installed (`{kubectl}`: {e}): {hint}"),
    }
}

/// Every directory under `deploy/kubernetes` with a kustomization file.
fn kustomize_dirs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        if entries.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                n == "kustomization.yaml" || n == "kustomization.yml" || n == "Kustomization"
            })
        }) {
            out.push(dir.to_owned());
        }
        for p in entries.into_iter().filter(|p| p.is_dir()) {
            walk(&p, out);
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir().join("kubernetes"), &mut out);
    out
}

fn render(kubectl: &str, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "`kubectl kustomize {}` failed: {}",
        dir.display(),
        describe(&out)
    );
    yaml_docs(
        &String::from_utf8(out.stdout).expect("UTF-8 manifests"),
        &dir.display().to_string(),
    )
}

fn kind(v: &Value) -> &str {
    str_at(v, "/kind").unwrap_or("")
}

fn name(v: &Value) -> &str {
    str_at(v, "/metadata/name").unwrap_or("")
}

/// `(name, key) -> value` of the Secrets in the directory's YAML files that the
/// kustomization does not render (the examples).
fn example_secrets(dir: &Path) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read kustomize dir") {
        let path = entry.expect("entry").path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if !is_yaml || path.file_stem().is_some_and(|s| s == "kustomization") {
            continue;
        }
        for doc in yaml_docs(&read(&path), &path.display().to_string()) {
            if kind(&doc) != "Secret" {
                continue;
            }
            if let Some(data) = doc.get("stringData").and_then(Value::as_object) {
                for (k, v) in data {
                    let v = v.as_str().unwrap_or_default().to_owned();
                    out.insert((name(&doc).to_owned(), k.clone()), v);
                }
            }
        }
    }
    out
}

/// The pod template of a workload.
fn pod_template(workload: &Value) -> Option<&Value> {
    match kind(workload) {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            workload.pointer("/spec/template")
        }
        "Pod" => Some(workload),
        _ => None,
    }
}

fn is_gateway_image(image: &str) -> bool {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next() == Some("send-gateway")
}

/// Seconds a container's preStop hook holds it before SIGTERM (a `sleep` action, or an
/// exec of `sleep N`), and whether it is an exec hook.
fn pre_stop(container: &Value) -> (u64, bool) {
    let Some(hook) = container.pointer("/lifecycle/preStop") else {
        return (0, false);
    };
    if let Some(s) = hook.pointer("/sleep/seconds").and_then(Value::as_u64) {
        return (s, false);
    }
    let Some(cmd) = hook.pointer("/exec/command").and_then(Value::as_array) else {
        return (0, false);
    };
    let words = strings(cmd).join(" ");
    let secs = words
        .split("sleep ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or(0);
    (secs, true)
}

/// The number a probe's or Service's port names, in `containers`.
fn resolve_port(port: &Value, containers: &[&Value]) -> Option<u16> {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).ok();
    }
    let wanted = port.as_str()?;
    if let Ok(n) = wanted.parse() {
        return Some(n);
    }
    containers.iter().find_map(|c| {
        arr_at(c, "/ports").iter().find_map(|p| {
            (str_at(p, "/name") == Some(wanted))
                .then(|| p.get("containerPort").and_then(Value::as_u64))
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
        })
    })
}

fn selects(selector: Option<&Value>, labels: Option<&Value>) -> bool {
    let (Some(sel), Some(labels)) = (
        selector.and_then(Value::as_object),
        labels.and_then(Value::as_object),
    ) else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Writes the file a container sees at `path` into `tmp` and returns where, looking first at
/// the container's ConfigMap mounts, then at what the image ships.
fn container_file(
    path: &str,
    container: &Value,
    pod: &Value,
    config_maps: &BTreeMap<String, Value>,
    image: &Image,
    tmp: &Path,
) -> Result<PathBuf, String> {
    for mount in arr_at(container, "/volumeMounts") {
        let mount_path = str_at(mount, "/mountPath")
            .unwrap_or("")
            .trim_end_matches('/');
        let volume = str_at(mount, "/name").unwrap_or("");
        let key = match str_at(mount, "/subPath") {
            Some(sub) if path == mount_path => sub.to_owned(),
            Some(_) => continue,
            None => match path.strip_prefix(&format!("{mount_path}/")) {
                Some(rest) => rest.to_owned(),
                None => continue,
            },
        };
        let spec = arr_at(pod, "/spec/volumes")
            .iter()
            .find(|v| str_at(v, "/name") == Some(volume))
            .ok_or_else(|| format!("volumeMount {volume} has no volume"))?;
        let Some(cm_name) = str_at(spec, "/configMap/name") else {
            return Err(format!(
                "{path} is on volume {volume}, which is not a ConfigMap"
            ));
        };
        let cm = config_maps
            .get(cm_name)
            .ok_or_else(|| format!("ConfigMap {cm_name} (volume {volume}) is not rendered"))?;
        // `items` maps keys to other file names.
        let items = arr_at(spec, "/configMap/items");
        let data_key = if items.is_empty() {
            Some(key.clone())
        } else {
            items.iter().find_map(|i| {
                (str_at(i, "/path") == Some(key.as_str()))
                    .then(|| str_at(i, "/key").map(str::to_owned))
                    .flatten()
            })
        };
        let text = data_key
            .as_deref()
            .and_then(|k| str_at(cm, &format!("/data/{k}")))
            .ok_or_else(|| format!("{path}: ConfigMap {cm_name} has no key {key}"))?;
        let file = tmp.join(key.replace('/', "_"));
        std::fs::write(&file, text).map_err(|e| e.to_string())?;
        return Ok(file);
    }
    image
        .shipped_file(path)
        .ok_or_else(|| format!("{path} is neither mounted from a ConfigMap nor in the image"))
}

/// One rendered kustomize directory.
#[derive(Debug)]
struct Rendered {
    dir: PathBuf,
    docs: Vec<Value>,
    config_maps: BTreeMap<String, Value>,
    secrets: BTreeMap<(String, String), String>,
}

impl Rendered {
    fn load(kubectl: &str, dir: &Path) -> Rendered {
        let docs = render(kubectl, dir);
        let config_maps = docs
            .iter()
            .filter(|d| kind(d) == "ConfigMap")
            .map(|d| (name(d).to_owned(), d.clone()))
            .collect();
        Rendered {
            dir: dir.to_owned(),
            docs,
            config_maps,
            secrets: example_secrets(dir),
        }
    }

    fn of_kind<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| kind(d) == k)
    }
}

/// What one gateway container runs with, once checked.
#[derive(Debug)]
struct Checked {
    workload: String,
    effective: Effective,
    sidecar: bool,
}

/// Checks every gateway container of a rendered directory against the binary.
fn check_rendered(r: &Rendered, image: &Image, p: &mut Problems) -> Vec<Checked> {
    let mut checked = Vec::new();
    let mut found = 0;
    p.check(r.of_kind("Secret").next().is_none(), || {
        format!(
            "{} renders a Secret: keep secrets out of the repository (secret.example.yaml \
             is not a resource)",
            r.dir.display()
        )
    });
    for workload in &r.docs {
        let Some(template) = pod_template(workload) else {
            continue;
        };
        let wname = format!("{}/{}", kind(workload), name(workload));
        let regular: Vec<&Value> = arr_at(template, "/spec/containers").iter().collect();
        let init: Vec<&Value> = arr_at(template, "/spec/initContainers").iter().collect();
        let all: Vec<&Value> = regular.iter().chain(init.iter()).copied().collect();
        for (container, is_init) in regular
            .iter()
            .map(|c| (*c, false))
            .chain(init.iter().map(|c| (*c, true)))
        {
            if !str_at(container, "/image").is_some_and(is_gateway_image) {
                continue;
            }
            found += 1;
            let cname = format!(
                "{wname} container {}",
                str_at(container, "/name").unwrap_or("?")
            );
            let others: Vec<&Value> = all
                .iter()
                .filter(|c| !str_at(c, "/image").is_some_and(is_gateway_image))
                .copied()
                .collect();
            let sidecar = !others.is_empty();
            if is_init {
                p.check(
                    str_at(container, "/restartPolicy") == Some("Always"),
                    || {
                        format!(
                            "{cname}: an init container without restartPolicy: Always never \
                         finishes, so the pod never starts"
                        )
                    },
                );
            }
            if let Some(eff) = check_container(r, image, template, container, &others, &cname, p) {
                checked.push(Checked {
                    workload: wname.clone(),
                    effective: eff,
                    sidecar,
                });
            }
        }
    }
    p.check(found > 0, || {
        format!("{}: no send-gateway container", r.dir.display())
    });
    checked
}

fn check_container(
    r: &Rendered,
    image: &Image,
    pod: &Value,
    container: &Value,
    others: &[&Value],
    cname: &str,
    p: &mut Problems,
) -> Option<Effective> {
    let tmp = tempfile::tempdir().expect("temp dir");

    // The binary runs the image's entrypoint with `args`.
    if let Some(cmd) = container.get("command") {
        let cmd = strings(cmd.as_array().map_or(&[], Vec::as_slice));
        p.check(cmd.len() == 1 && cmd[0].ends_with("send-gateway"), || {
            format!("{cname}: `command` {cmd:?} replaces the send-gateway entrypoint")
        });
    }
    let args = strings(arr_at(container, "/args"));

    // The environment: the image's, then the container's.
    p.check(container.get("envFrom").is_none(), || {
        format!("{cname}: envFrom hides which keys are set; list the variables one by one")
    });
    let mut env: BTreeMap<String, String> = image.env.iter().cloned().collect();
    for var in arr_at(container, "/env") {
        let Some(vname) = str_at(var, "/name") else {
            continue;
        };
        p.check(
            vname.to_ascii_uppercase().starts_with("SEND_GATEWAY__") || OTHER_ENV.contains(&vname),
            || format!("{cname}: send-gateway does not read the variable {vname}"),
        );
        let value = if let Some(v) = var.get("value") {
            v.as_str().unwrap_or_default().to_owned()
        } else if let Some(sk) = var.pointer("/valueFrom/secretKeyRef") {
            let (sname, key) = (
                str_at(sk, "/name").unwrap_or(""),
                str_at(sk, "/key").unwrap_or(""),
            );
            match r.secrets.get(&(sname.to_owned(), key.to_owned())) {
                Some(v) => v.clone(),
                None => {
                    p.push(format!(
                        "{cname}: {vname} reads key {key} of Secret {sname}, which no example \
                         Secret in {} documents",
                        r.dir.display()
                    ));
                    continue;
                }
            }
        } else if let Some(ck) = var.pointer("/valueFrom/configMapKeyRef") {
            let (cm, key) = (
                str_at(ck, "/name").unwrap_or(""),
                str_at(ck, "/key").unwrap_or(""),
            );
            match r
                .config_maps
                .get(cm)
                .and_then(|c| str_at(c, &format!("/data/{key}")))
            {
                Some(v) => v.to_owned(),
                None => {
                    p.push(format!(
                        "{cname}: {vname} reads missing ConfigMap key {cm}/{key}"
                    ));
                    continue;
                }
            }
        } else {
            p.push(format!(
                "{cname}: {vname} has no value this test can reproduce"
            ));
            continue;
        };
        env.insert(vname.to_owned(), value);
    }

    // The configuration file, from the ConfigMap mount (or the image).
    let resolve =
        |path: &str| container_file(path, container, pod, &r.config_maps, image, tmp.path());
    let mut run_args = args.clone();
    if let Some((index, path)) = config_arg(&args) {
        match resolve(&path) {
            Ok(local) => run_args = with_config_path(&args, index, &local),
            Err(e) => {
                p.push(format!("{cname}: --config {path}: {e}"));
                return None;
            }
        }
    }
    match resolve_config_env(&mut env, &args, resolve) {
        Ok(()) => {}
        Err(e) => {
            p.push(format!("{cname}: SEND_GATEWAY_CONFIG: {e}"));
            return None;
        }
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let out = check_config(&run_args, &env);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    if !out.status.success() {
        p.push(format!(
            "{cname}: `send-gateway {} check-config` with {names:?} set fails: {}",
            args.join(" "),
            describe(&out)
        ));
        return None;
    }
    let eff = match effective(&out) {
        Ok(e) => e,
        Err(e) => {
            p.push(format!("{cname}: {e}"));
            return None;
        }
    };

    // Ports: exactly the two listeners.
    let declared: BTreeSet<u16> = arr_at(container, "/ports")
        .iter()
        .filter_map(|port| port.get("containerPort").and_then(Value::as_u64))
        .filter_map(|n| u16::try_from(n).ok())
        .collect();
    let wanted: BTreeSet<u16> = [eff.listen.port(), eff.admin.port()].into();
    p.check(declared == wanted, || {
        format!(
            "{cname}: containerPorts {declared:?} differ from the listeners (proxy {}, admin {})",
            eff.listen, eff.admin
        )
    });
    // The kubelet probes the pod IP.
    p.check(eff.admin.ip().is_unspecified(), || {
        format!(
            "{cname}: admin_listen {} is not reachable by the kubelet's probes or Prometheus \
             (use 0.0.0.0:{})",
            eff.admin,
            eff.admin.port()
        )
    });

    // Probes on the admin listener.
    let me = [container];
    for (probe, path, required) in [
        ("livenessProbe", "/healthz", true),
        ("readinessProbe", "/readyz", true),
        ("startupProbe", "/healthz", false),
    ] {
        let Some(spec) = container.get(probe) else {
            p.check(!required, || format!("{cname}: no {probe}"));
            continue;
        };
        let got_path = str_at(spec, "/httpGet/path");
        p.check(got_path == Some(path), || {
            format!("{cname}: {probe} is not GET {path} (got {got_path:?})")
        });
        let port = spec
            .pointer("/httpGet/port")
            .and_then(|port| resolve_port(port, &me));
        p.check(port == Some(eff.admin.port()), || {
            format!(
                "{cname}: {probe} port {port:?} is not the admin port {}",
                eff.admin.port()
            )
        });
    }

    // Shutdown: the preStop hook, then shutdown_grace, within the grace period. A native
    // sidecar (init container, restartPolicy Always) is stopped only after the app
    // containers, so their preStop hooks come first.
    let (own, exec) = pre_stop(container);
    p.check(!exec, || {
        format!(
            "{cname}: an exec preStop hook cannot run in the distroless image (no shell, no \
             sleep binary): use `preStop: {{sleep: {{seconds: N}}}}`"
        )
    });
    let native_sidecar = str_at(container, "/restartPolicy") == Some("Always");
    let before = if native_sidecar {
        others.iter().map(|c| pre_stop(c).0).max().unwrap_or(0)
    } else {
        0
    };
    let grace = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    let needed = eff.shutdown_grace.as_secs() + own + before;
    p.check(grace > needed, || {
        format!(
            "{cname}: terminationGracePeriodSeconds {grace} must exceed preStop {own}s + \
             earlier preStop {before}s + shutdown_grace {}s",
            eff.shutdown_grace.as_secs()
        )
    });

    // Security.
    let run_as_non_root = container
        .pointer("/securityContext/runAsNonRoot")
        .or_else(|| pod.pointer("/spec/securityContext/runAsNonRoot"))
        .and_then(Value::as_bool);
    p.check(run_as_non_root == Some(true), || {
        format!("{cname}: runAsNonRoot is not set")
    });
    for (ptr, want) in [
        ("/securityContext/allowPrivilegeEscalation", false),
        ("/securityContext/readOnlyRootFilesystem", true),
    ] {
        let got = container.pointer(ptr).and_then(Value::as_bool);
        p.check(got == Some(want), || {
            format!("{cname}: {ptr} is {got:?}, not {want}")
        });
    }
    let drops = strings(arr_at(container, "/securityContext/capabilities/drop"));
    p.check(drops.iter().any(|d| d == "ALL"), || {
        format!("{cname}: capabilities are not dropped (drop: [ALL])")
    });

    // Resources, sized from the benchmarks.
    for ptr in [
        "/resources/requests/cpu",
        "/resources/requests/memory",
        "/resources/limits/memory",
    ] {
        p.check(container.pointer(ptr).is_some(), || {
            format!("{cname}: no {ptr}")
        });
    }
    if let Some(limit) = str_at(container, "/resources/limits/memory") {
        let bytes = quantity_bytes(limit);
        p.check(bytes.is_some_and(|b| b >= MIN_MEMORY_LIMIT), || {
            format!(
                "{cname}: memory limit {limit} is under 64Mi (peak RSS relaying 8 concurrent \
                 20 MB sends is about 40 MiB)"
            )
        });
    }
    Some(eff)
}

/// Checks that hold for every workload: Services, PodDisruptionBudgets, autoscalers,
/// replica counts, and the layout (sidecar on loopback or shared proxy on every interface).
fn check_topology(r: &Rendered, checked: &[Checked], p: &mut Problems) {
    for c in checked {
        let workload = r
            .docs
            .iter()
            .find(|d| format!("{}/{}", kind(d), name(d)) == c.workload)
            .expect("checked workload is rendered");
        let template = pod_template(workload).expect("pod template");
        let labels = template.pointer("/metadata/labels");
        let containers: Vec<&Value> = arr_at(template, "/spec/containers")
            .iter()
            .chain(arr_at(template, "/spec/initContainers"))
            .collect();
        let services: Vec<&Value> = r
            .of_kind("Service")
            .filter(|s| selects(s.pointer("/spec/selector"), labels))
            .collect();
        let eff = &c.effective;
        let w = &c.workload;

        if c.sidecar {
            p.check(eff.listen.ip().is_loopback(), || {
                format!(
                    "{w}: the sidecar's proxy listens on {}, not loopback: only the pod's own \
                     containers should send through it",
                    eff.listen
                )
            });
        } else {
            p.check(eff.listen.ip().is_unspecified(), || {
                format!(
                    "{w}: the shared proxy listens on {}, which its Service cannot reach",
                    eff.listen
                )
            });
            p.check(
                services.iter().any(|s| {
                    arr_at(s, "/spec/ports").iter().any(|port| {
                        port.get("targetPort")
                            .and_then(|t| resolve_port(t, &containers))
                            == Some(eff.listen.port())
                    })
                }),
                || {
                    format!(
                        "{w}: no Service sends clients to the proxy port {}",
                        eff.listen.port()
                    )
                },
            );
        }
        for s in &services {
            for port in arr_at(s, "/spec/ports") {
                let target = port
                    .get("targetPort")
                    .or_else(|| port.get("port"))
                    .and_then(|t| resolve_port(t, &containers));
                p.check(
                    target == Some(eff.listen.port()) || target == Some(eff.admin.port()),
                    || {
                        format!(
                            "Service/{}: port {port} does not reach a gateway listener",
                            name(s)
                        )
                    },
                );
            }
        }
        // Prometheus scrape annotations point at the admin port.
        for holder in services.iter().copied().chain([template]) {
            if let Some(port) = str_at(holder, "/metadata/annotations/prometheus.io~1port") {
                p.check(port == eff.admin.port().to_string(), || {
                    format!("{w}: prometheus.io/port {port} is not the admin port")
                });
                let path = str_at(holder, "/metadata/annotations/prometheus.io~1path");
                p.check(path.is_none_or(|x| x == "/metrics"), || {
                    format!("{w}: prometheus.io/path {path:?} is not /metrics")
                });
            }
        }

        // Replicas. Memory counters are per process: only one pod may count.
        let hpas: Vec<&Value> = r
            .of_kind("HorizontalPodAutoscaler")
            .filter(|h| {
                str_at(h, "/spec/scaleTargetRef/kind") == Some(kind(workload))
                    && str_at(h, "/spec/scaleTargetRef/name") == Some(name(workload))
            })
            .collect();
        let replicas = workload
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        if eff.backend == StoreBackend::Memory {
            p.check(replicas <= 1 && hpas.is_empty(), || {
                format!(
                    "{w}: the memory store counts per pod, but {replicas} replicas (or an \
                     autoscaler) would each count separately: use backend = \"redis\""
                )
            });
            if kind(workload) == "Deployment" {
                let strategy = str_at(workload, "/spec/strategy/type");
                p.check(strategy == Some("Recreate"), || {
                    format!(
                        "{w}: with the memory store a rolling update runs two counting pods \
                         at once: use strategy Recreate"
                    )
                });
            }
        } else {
            p.check(
                eff.store_url.starts_with("redis://")
                    || eff.store_url.starts_with("rediss://")
                    || eff.store_url.starts_with("redis+cluster://"),
                || format!("{w}: store url is not a Redis URL"),
            );
        }
        for h in &hpas {
            let min = h.pointer("/spec/minReplicas").and_then(Value::as_u64);
            p.check(min.is_some_and(|m| m >= 2), || {
                format!(
                    "HorizontalPodAutoscaler/{}: minReplicas {min:?} under 2 leaves no \
                     replica while one drains",
                    name(h)
                )
            });
            p.check(str_at(h, "/apiVersion") == Some("autoscaling/v2"), || {
                format!("HorizontalPodAutoscaler/{}: use autoscaling/v2", name(h))
            });
        }
        for pdb in r.of_kind("PodDisruptionBudget") {
            p.check(
                selects(pdb.pointer("/spec/selector/matchLabels"), labels),
                || format!("PodDisruptionBudget/{} selects no gateway pod", name(pdb)),
            );
        }
    }
    for hpa in r.of_kind("HorizontalPodAutoscaler") {
        let target = (
            str_at(hpa, "/spec/scaleTargetRef/kind").unwrap_or(""),
            str_at(hpa, "/spec/scaleTargetRef/name").unwrap_or(""),
        );
        p.check(r.docs.iter().any(|d| (kind(d), name(d)) == target), || {
            format!(
                "HorizontalPodAutoscaler/{} scales a missing {target:?}",
                name(hpa)
            )
        });
    }
}

#[test]
fn every_kustomization_matches_the_binary() {
    let kubectl = kubectl();
    assert_env_layer_is_live();
    let image = dockerfile();
    let dirs = kustomize_dirs();
    let names: BTreeSet<String> = dirs
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for required in ["sidecar", "standalone"] {
        assert!(
            names.contains(required),
            "deploy/kubernetes/{required} is missing: {names:?}"
        );
    }
    let mut p = Problems::default();
    for dir in &dirs {
        let r = Rendered::load(&kubectl, dir);
        let checked = check_rendered(&r, &image, &mut p);
        check_topology(&r, &checked, &mut p);
    }
    p.assert_none("deploy/kubernetes");
}

#[test]
fn sidecar_and_standalone_have_their_layouts() {
    let kubectl = kubectl();
    let image = dockerfile();
    let k8s = deploy_dir().join("kubernetes");

    let mut p = Problems::default();
    let sidecar = Rendered::load(&kubectl, &k8s.join("sidecar"));
    // Container problems are every_kustomization_matches_the_binary's to report.
    let checked = check_rendered(&sidecar, &image, &mut Problems::default());
    assert!(
        checked.iter().any(|c| c.sidecar),
        "deploy/kubernetes/sidecar has no app pod with a valid gateway beside it (see \
         every_kustomization_matches_the_binary)"
    );
    // The app reaches Nylas through the sidecar's loopback listener.
    let app_uses_proxy = sidecar.docs.iter().filter_map(pod_template).any(|t| {
        arr_at(t, "/spec/containers").iter().any(|c| {
            !str_at(c, "/image").is_some_and(is_gateway_image)
                && arr_at(c, "/env").iter().any(|e| {
                    str_at(e, "/value").is_some_and(|v| {
                        checked.iter().any(|g| {
                            host_port(v).is_some_and(|(h, port)| {
                                (h == "127.0.0.1" || h == "localhost")
                                    && port == g.effective.listen.port()
                            })
                        })
                    })
                })
        })
    });
    p.check(app_uses_proxy, || {
        "the sidecar example's app is not pointed at http://127.0.0.1:<proxy port>".into()
    });

    let standalone = Rendered::load(&kubectl, &k8s.join("standalone"));
    let checked = check_rendered(&standalone, &image, &mut Problems::default());
    p.check(checked.iter().all(|c| !c.sidecar), || {
        "deploy/kubernetes/standalone runs the gateway beside something else".into()
    });
    p.check(
        checked
            .iter()
            .all(|c| c.effective.backend == StoreBackend::Redis),
        || "the standalone gateway does not count in Redis".into(),
    );
    for k in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    ] {
        p.check(standalone.of_kind(k).next().is_some(), || {
            format!("deploy/kubernetes/standalone renders no {k}")
        });
    }
    // The Redis URL comes from a Secret, not from the ConfigMap.
    let url_from_secret = standalone.of_kind("Deployment").any(|d| {
        pod_template(d).is_some_and(|t| {
            arr_at(t, "/spec/containers").iter().any(|c| {
                arr_at(c, "/env").iter().any(|e| {
                    str_at(e, "/name") == Some("SEND_GATEWAY__STORE__URL")
                        && e.pointer("/valueFrom/secretKeyRef").is_some()
                })
            })
        })
    });
    p.check(url_from_secret, || {
        "the standalone Redis URL does not come from a Secret (SEND_GATEWAY__STORE__URL)".into()
    });
    for (name, pdb) in standalone
        .of_kind("PodDisruptionBudget")
        .map(|d| (name(d), d))
    {
        let min = pdb.pointer("/spec/minAvailable").and_then(Value::as_u64);
        p.check(min == Some(1), || {
            format!("PodDisruptionBudget/{name}: minAvailable {min:?}, expected 1")
        });
    }
    p.assert_none("layouts");
}
