//! The committed OpenAPI document must match the one generated from the
//! code. Regenerate with `HANGAR_UPDATE_OPENAPI=1 cargo test -p hangar-daemon --test openapi`.

#[test]
fn committed_openapi_matches_the_code() {
    let generated = serde_json::to_string_pretty(&hangar_daemon::openapi()).unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/hangar.json");
    if std::env::var_os("HANGAR_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/hangar.json is out of date with the code: run \
         HANGAR_UPDATE_OPENAPI=1 cargo test -p hangar-daemon --test openapi and commit the result"
    );
}

#[test]
fn every_operation_documents_its_errors() {
    let doc = serde_json::to_value(hangar_daemon::openapi()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 15, "{:?}", paths.keys());
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|c| c.starts_with('4')),
                "{method} {path} documents no 4xx response"
            );
        }
    }
}

/// The committed document is valid OpenAPI, by a validator nobody here
/// wrote (installed by `scripts/install-deps.sh --test`).
#[test]
fn committed_openapi_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let validator = root.join("target/test-tools/venv/bin/openapi-spec-validator");
    assert!(
        validator.is_file(),
        "{} missing: run scripts/install-deps.sh --test",
        validator.display()
    );
    let out = std::process::Command::new(&validator)
        .arg(root.join("openapi/hangar.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi/hangar.json is not valid OpenAPI:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
