//! `deploy/Dockerfile` against the real binary: a multi-stage build on the toolchain's Rust,
//! a non-root numeric user, and a default command (and `docker run IMAGE check-config`) that
//! passes `send-gateway check-config` with listeners the image EXPOSEs. The default command
//! opens the admin port, so it needs the admin token from `docker run -e`; without one it
//! refuses to start.

mod deploy_support;

use deploy_support::{
    Problems, check_config, config_arg, describe, dockerfile, effective, image_env,
    with_config_path,
};

#[test]
fn dockerfile_runs_the_binary_with_valid_defaults() {
    let image = dockerfile();
    let mut p = Problems::default();

    let build = image
        .all
        .iter()
        .filter(|(o, _)| o == "RUN")
        .map(|(_, r)| r.as_str())
        .find(|r| r.contains("cargo build"))
        .expect("deploy/Dockerfile runs cargo build");
    for needle in ["--release", "--locked", "-p gateway", "-p fake-nylas"] {
        p.check(build.contains(needle), || {
            format!("the cargo build does not pass {needle}: {build}")
        });
    }
    let froms: Vec<&str> = image
        .all
        .iter()
        .filter(|(o, _)| o == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    p.check(froms.len() >= 2, || {
        "the Dockerfile is not multi-stage".into()
    });
    p.check(froms[0].starts_with("rust:1.95"), || {
        format!(
            "the builder is not rust:1.95 (rust-toolchain.toml): {}",
            froms[0]
        )
    });
    p.check(
        image.entrypoint.len() == 1 && image.entrypoint[0].ends_with("/send-gateway"),
        || {
            format!(
                "ENTRYPOINT is not the send-gateway binary: {:?}",
                image.entrypoint
            )
        },
    );
    p.check(
        !image.user.is_empty() && !["root", "0", "0:0"].contains(&image.user.as_str()),
        || format!("the image runs as root (USER {:?})", image.user),
    );
    p.check(
        image.user.split(':').all(|s| s.parse::<u32>().is_ok()),
        || {
            format!(
                "USER {} is not numeric, so Kubernetes' runAsNonRoot cannot verify it",
                image.user
            )
        },
    );

    // The default command, as `docker run IMAGE` runs it.
    let (index, path) = config_arg(&image.cmd).expect("CMD passes --config");
    let file = image
        .shipped_file(&path)
        .unwrap_or_else(|| panic!("CMD's --config {path} is not a file the image ships"));
    let args = with_config_path(&image.cmd, index, &file);
    let env = image_env(&image);
    // No token baked into the image: `docker run IMAGE` alone refuses an open admin port.
    let bare = check_config(&args, &env);
    let stderr = String::from_utf8_lossy(&bare.stderr);
    p.check(
        bare.status.code() == Some(64) && stderr.contains("server.admin_token must be set"),
        || {
            format!(
                "`send-gateway {} check-config` without an admin token does not refuse the open admin port: {}",
                image.cmd.join(" "),
                describe(&bare)
            )
        },
    );
    // `docker run -e SEND_GATEWAY__SERVER__ADMIN_TOKEN=... IMAGE`, as deploy/README.md says.
    let mut env_with_token = env.clone();
    env_with_token.push((
        "SEND_GATEWAY__SERVER__ADMIN_TOKEN".to_owned(),
        "from-docker-run".to_owned(),
    ));
    let out = check_config(&args, &env_with_token);
    p.check(out.status.success(), || {
        format!(
            "`send-gateway {} check-config` with SEND_GATEWAY__SERVER__ADMIN_TOKEN fails: {}",
            image.cmd.join(" "),
            describe(&out)
        )
    });
    match effective(&out) {
        Ok(eff) => {
            for (what, addr) in [("proxy", eff.listen), ("admin", eff.admin)] {
                p.check(addr.ip().is_unspecified(), || {
                    format!("the image's {what} listener {addr} cannot be reached from outside the container")
                });
                p.check(image.expose.contains(&addr.port()), || {
                    format!("the image's {what} port {} is not EXPOSEd", addr.port())
                });
            }
        }
        Err(e) => p.push(format!("CMD's configuration: {e}")),
    }

    // `docker run IMAGE check-config`: the image's own SEND_GATEWAY_CONFIG.
    let out = check_config(&[], &env);
    p.check(out.status.success(), || {
        format!(
            "`send-gateway check-config` in the image fails: {}",
            describe(&out)
        )
    });
    p.assert_none("deploy/Dockerfile");
}
