//! `infra/local/cluster.sh` starts a working two-region cluster and stops everything it
//! started.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use confab_testkit::free_port;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../infra/local/cluster.sh")
}

#[test]
fn the_local_cluster_script_starts_two_regions_and_stops_everything() {
    let dir = std::env::temp_dir().join(format!("confab-local-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ports: Vec<(String, u16)> = [
        "REDIS_DIRECTORY_PORT",
        "REDIS_C1_PORT",
        "REDIS_C2_PORT",
        "CELL_C1_PORT",
        "CELL_C2_PORT",
        "GATEWAY_1_PORT",
        "GATEWAY_2_PORT",
    ]
    .iter()
    .map(|name| (name.to_string(), free_port()))
    .collect();
    let run = |action: &str| {
        let mut command = Command::new("bash");
        command
            .arg(script())
            .arg(action)
            .env("CONFAB_BIN", env!("CARGO_BIN_EXE_confab"))
            .env("CONFAB_CLUSTER_DIR", &dir)
            .env("CONFAB_LOG", "warn");
        for (name, port) in &ports {
            command.env(name, port.to_string());
        }
        command.output().expect("run cluster.sh")
    };
    let started = run("start");
    let out = String::from_utf8_lossy(&started.stdout).to_string();
    let stopped = run("stop");
    assert!(
        started.status.success(),
        "start failed: {out}\n{}",
        String::from_utf8_lossy(&started.stderr)
    );
    assert!(stopped.status.success());
    for needle in [
        "c1",
        "us-east",
        "c2",
        "eu-west",
        "token acme/alice: ey",
        "token globex/bob: ey",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert_eq!(out.matches("healthy").count(), 2, "{out}");
    // Everything it started is gone: no pid file is left and no port still answers.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .collect();
    assert!(left.is_empty(), "pid files left: {left:?}");
    for (name, port) in &ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(),
            "{name} port {port} still answers after stop"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
