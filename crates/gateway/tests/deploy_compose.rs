//! `deploy/compose.yaml` against the real binary: its gateway service passes
//! `send-gateway check-config` with the file and environment compose gives it, and its ports
//! and service names line up with Redis and the fake Nylas beside it.

mod deploy_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use deploy_support::{
    OTHER_ENV, Problems, arr_at, assert_env_layer_is_live, check_config, config_arg, deploy_dir,
    describe, dockerfile, effective, host_port, read, resolve_config_env, str_at, strings,
    with_config_path, workspace, yaml,
};
use gateway::config::StoreBackend;
use serde_json::Value;

fn compose_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => strings(a),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn compose_env(service: &Value) -> Vec<(String, String)> {
    match service.get("environment") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Some(Value::Array(a)) => strings(a)
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Container ports a service publishes.
fn compose_published(service: &Value) -> BTreeSet<u16> {
    arr_at(service, "/ports")
        .iter()
        .filter_map(|port| match port {
            Value::String(s) => s
                .rsplit(':')
                .next()
                .and_then(|c| c.trim_end_matches("/tcp").parse().ok()),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::Object(_) => port
                .get("target")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok()),
            _ => None,
        })
        .collect()
}

#[test]
fn compose_runs_the_gateway_against_redis_and_the_fake() {
    assert_env_layer_is_live();
    let image = dockerfile();
    let compose = yaml(
        &read(&deploy_dir().join("compose.yaml")),
        "deploy/compose.yaml",
    );
    let services = compose
        .get("services")
        .and_then(Value::as_object)
        .expect("compose.yaml has services");
    let mut p = Problems::default();
    for required in ["gateway", "redis", "fake-nylas"] {
        p.check(services.contains_key(required), || {
            format!("compose.yaml has no service {required}")
        });
    }
    p.assert_none("deploy/compose.yaml");
    let mut p = Problems::default();

    // Built from the repository root with deploy/Dockerfile.
    for (sname, s) in services {
        if let Some(build) = s.get("build") {
            let context = str_at(build, "/context").unwrap_or(".");
            let dockerfile = str_at(build, "/dockerfile").unwrap_or("Dockerfile");
            let root = deploy_dir().join(context).canonicalize().ok();
            p.check(root.as_deref() == Some(workspace().as_path()), || {
                format!("{sname}: build context {context} is not the repository root")
            });
            p.check(
                workspace().join(dockerfile).is_file() && dockerfile == "deploy/Dockerfile",
                || format!("{sname}: builds {dockerfile}, not deploy/Dockerfile"),
            );
        }
    }
    let redis = &services["redis"];
    p.check(
        str_at(redis, "/image").is_some_and(|i| i.starts_with("redis:7")),
        || "the redis service is not redis:7".into(),
    );

    // The fake Nylas: its own binary from the same image, on every interface.
    let fake = &services["fake-nylas"];
    let fake_entry = compose_list(fake.get("entrypoint"));
    p.check(
        fake_entry.len() == 1 && fake_entry[0].ends_with("/fake-nylas"),
        || format!("fake-nylas's entrypoint {fake_entry:?} is not the fake-nylas binary"),
    );
    let fake_cmd = compose_list(fake.get("command"));
    let fake_listen: Option<SocketAddr> = fake_cmd
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| fake_cmd.get(i + 1))
        .and_then(|a| a.parse().ok());
    p.check(fake_listen.is_some_and(|a| a.ip().is_unspecified()), || {
        format!("fake-nylas does not --listen on 0.0.0.0: {fake_cmd:?}")
    });

    // The gateway: the image's entrypoint with `command` as its arguments.
    let gw = &services["gateway"];
    p.check(gw.get("entrypoint").is_none(), || {
        "the gateway service replaces the image's entrypoint".into()
    });
    let args = compose_list(gw.get("command"));
    let args = if args.is_empty() {
        image.cmd.clone()
    } else {
        args
    };
    let mut env: BTreeMap<String, String> = image.env.iter().cloned().collect();
    for (k, v) in compose_env(gw) {
        p.check(
            k.to_ascii_uppercase().starts_with("SEND_GATEWAY__") || OTHER_ENV.contains(&k.as_str()),
            || format!("gateway: send-gateway does not read the variable {k}"),
        );
        env.insert(k, v);
    }
    // A bind mount of a repository file, or a file the image ships.
    let resolve = |path: &str| {
        arr_at(gw, "/volumes")
            .iter()
            .find_map(|v| {
                let mut parts = v.as_str()?.split(':');
                let (src, dst) = (parts.next()?, parts.next()?);
                (dst == path).then(|| deploy_dir().join(src))
            })
            .or_else(|| image.shipped_file(path))
            .ok_or_else(|| format!("{path} is neither mounted nor shipped"))
    };
    let mut run_args = args.clone();
    if let Some((index, path)) = config_arg(&args) {
        match resolve(&path) {
            Ok(local) => run_args = with_config_path(&args, index, &local),
            Err(e) => p.push(format!("gateway: --config {e}")),
        }
    }
    match resolve_config_env(&mut env, &args, resolve) {
        Ok(()) => {}
        Err(e) => p.push(format!("gateway: SEND_GATEWAY_CONFIG: {e}")),
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let out = check_config(&run_args, &env);
    p.check(out.status.success(), || {
        format!(
            "gateway: `send-gateway {} check-config` with its environment fails: {}",
            args.join(" "),
            describe(&out)
        )
    });
    match effective(&out) {
        Ok(eff) => {
            let published = compose_published(gw);
            for (what, addr) in [("proxy", eff.listen), ("admin", eff.admin)] {
                p.check(addr.ip().is_unspecified(), || {
                    format!("gateway: the {what} listener {addr} is unreachable from the host")
                });
                p.check(published.contains(&addr.port()), || {
                    format!("gateway: the {what} port {} is not published", addr.port())
                });
            }
            let upstream = host_port(&eff.upstream);
            p.check(
                upstream.as_ref().is_some_and(|(h, port)| {
                    h == "fake-nylas" && Some(*port) == fake_listen.map(|a| a.port())
                }),
                || {
                    format!(
                        "gateway: upstream {} is not the fake-nylas service's port",
                        eff.upstream
                    )
                },
            );
            p.check(eff.backend == StoreBackend::Redis, || {
                "gateway: the store is not Redis".into()
            });
            p.check(
                host_port(&eff.store_url).is_some_and(|(h, port)| h == "redis" && port == 6379),
                || {
                    format!(
                        "gateway: store url {} is not the redis service",
                        eff.store_url
                    )
                },
            );
        }
        Err(e) => p.push(format!("gateway: {e}")),
    }
    let depends: BTreeSet<String> = match gw.get("depends_on") {
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        Some(Value::Array(a)) => strings(a).into_iter().collect(),
        _ => BTreeSet::new(),
    };
    for dep in ["redis", "fake-nylas"] {
        p.check(depends.contains(dep), || {
            format!("gateway does not depend_on {dep}")
        });
    }
    p.assert_none("deploy/compose.yaml");
}
