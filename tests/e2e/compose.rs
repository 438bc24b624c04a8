//! docker-compose.yml cannot run here (no Docker engine), so it is parsed and checked: the
//! services the README promises, the Dockerfile it builds, and a latchkey config that
//! `check-config` accepts.

use std::process::Command;

fn compose() -> serde_json::Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open('docker-compose.yml'))))",
        ])
        .output()
        .expect("python3 with PyYAML is needed");
    assert!(
        out.status.success(),
        "docker-compose.yml does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn compose_file_brings_up_openbao_latchkey_and_an_upstream() {
    let c = compose();
    let services = c["services"].as_object().unwrap();
    for name in ["openbao", "seed", "upstream", "latchkey"] {
        assert!(services.contains_key(name), "no {name} service");
    }
    let bao = &services["openbao"];
    let cmd: Vec<&str> = bao["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(cmd.contains(&"-dev"), "OpenBao runs in dev mode");

    let lk = &services["latchkey"];
    assert_eq!(lk["build"]["dockerfile"], "Dockerfile");
    assert!(std::path::Path::new("Dockerfile").is_file());
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(dockerfile.contains("cargo build --release"));
    assert_eq!(lk["environment"]["VAULT_ADDR"], "http://openbao:8200");
    let token = lk["environment"]["VAULT_TOKEN"].as_str().unwrap();
    assert_eq!(
        bao["command"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v.as_str().unwrap().strip_prefix("-dev-root-token-id="))
            .unwrap(),
        token
    );

    // The seeded connection names the upstream service, and its config is valid.
    let seed: Vec<&str> = services["seed"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(seed.contains(&"latchkey/connections/demo"));
    assert!(seed.contains(&"base_url=http://upstream:8000"));
    let volume = lk["volumes"][0].as_str().unwrap();
    let host_path = volume.split(':').next().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .arg("check-config")
        .arg(host_path)
        .env("VAULT_TOKEN", token)
        .env("VAULT_ADDR", "http://openbao:8200")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{host_path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
