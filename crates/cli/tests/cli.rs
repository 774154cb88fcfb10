//! The `hangar` CLI against a real daemon: the commands a person or a
//! script uses, their exit codes, and `--json` output.

mod common;

use std::process::Command;

use common::{Daemon, HANGAR};
use serde_json::Value;

fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(
        out.status.success(),
        "hangar {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_with_the_cli() {
    let d = Daemon::start();
    let image = common::busybox_image();

    // `run` creates the default app on first use.
    let created: Value = serde_json::from_str(&ok(
        &d,
        &["--json", "machine", "run", &image, "--name", "box", "-e", "GREETING=hi"],
    ))
    .unwrap();
    assert_eq!(created["state"], "started");
    let table = ok(&d, &["machine", "ls"]);
    assert!(
        table.starts_with("ID") && table.contains("box") && table.contains("started"),
        "{table}"
    );

    // exec streams output and exits with the command's code.
    let out = d.cli(&[
        "machine",
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "echo $GREETING; echo oops >&2; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    // cp both ways, binary-safe, keeping the mode.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("tool.bin");
    let data: Vec<u8> = (0..=255u8).rev().cycle().take(70_000).collect();
    std::fs::write(&local, &data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o750)).unwrap();
    ok(&d, &["machine", "cp", local.to_str().unwrap(), "box:/opt/tool.bin"]);
    assert_eq!(
        ok(
            &d,
            &["machine", "exec", "box", "--", "stat", "-c", "%a %s", "/opt/tool.bin"]
        ),
        "750 70000\n"
    );
    let back = dir.path().join("back.bin");
    ok(&d, &["machine", "cp", "box:/opt/tool.bin", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), data);

    ok(&d, &["machine", "stop", "box"]);
    let status = ok(&d, &["machine", "status", "box"]);
    assert!(status.contains("state:       stopped"), "{status}");
    ok(&d, &["machine", "start", "box"]);
    assert_eq!(
        ok(
            &d,
            &["machine", "exec", "box", "--", "stat", "-c", "%s", "/opt/tool.bin"]
        ),
        "70000\n"
    );
    let ps = ok(&d, &["machine", "ps", "box"]);
    assert!(ps.contains("sleep 2147483647"), "{ps}");
    let events = ok(&d, &["machine", "events", "box"]);
    assert!(events.contains("stopping"), "{events}");

    // Errors say what is wrong, on stderr, with a non-zero exit.
    let out = d.cli(&["machine", "rm", "box"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("force"), "{err}");
    let out = d.cli(&["machine", "status", "ghost"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = d.cli(&["machine", "cp", "a", "b"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("MACHINE:/absolute/path"));
    ok(&d, &["machine", "rm", "--force", "box"]);

    // An app of its own, a machine created without starting, then started;
    // its main process's output through `logs`.
    assert_eq!(ok(&d, &["app", "create", "work"]), "created app work\n");
    assert!(ok(&d, &["app", "ls"]).contains("work"));
    let created = ok(
        &d,
        &[
            "machine",
            "create",
            "-a",
            "work",
            &image,
            "--name",
            "job",
            "--",
            "sh",
            "-c",
            "echo job-output; sleep 1000",
        ],
    );
    assert!(created.contains("job created"), "{created}");
    ok(&d, &["machine", "start", "-a", "work", "job"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ok(&d, &["machine", "logs", "-a", "work", "job"]).contains("job-output") {
        assert!(
            std::time::Instant::now() < deadline,
            "the main process's output never reached the logs"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // A daemon that isn't there is named in the error.
    let out = Command::new(HANGAR)
        .args(["app", "ls"])
        .env("HANGAR_URL", "http://127.0.0.1:9")
        .env("HANGAR_TOKEN", "x")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the daemon at http://127.0.0.1:9"));
}
