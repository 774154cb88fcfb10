//! Checkpoints, rollback and fork, through the API and the CLI, with real
//! machines: what a restore brings back is exactly what was checkpointed
//! (the whole tree hashed), forks are isolated both ways, and deleting
//! frees what nobody else uses and nothing that someone does.

mod common;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A hash of the machine's whole root filesystem: every path's name, type,
/// mode, owner, size, mtime and link target, and every file's content.
/// Mount points the runtime makes afresh at each start are left out.
const TREE_HASH: &str = r#"cd / && {
  find . -xdev \( -path ./.hangar -o -path ./dev -o -path ./proc -o -path ./sys \) -prune -o -exec stat -c '%n %f %u %g %s %Y %N' {} + ;
  find . -xdev \( -path ./.hangar -o -path ./dev -o -path ./proc -o -path ./sys \) -prune -o -type f -exec md5sum {} + ;
} | sort | md5sum"#;

async fn tree_hash(d: &Daemon, app: &str, id: &str) -> String {
    d.sh(app, id, TREE_HASH).await
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

fn machine_url(app: &str, id: &str) -> String {
    format!("/v1/apps/{app}/machines/{id}")
}

async fn checkpoint(d: &Daemon, app: &str, id: &str, comment: &str) -> Value {
    d.ok(
        Method::POST,
        &format!("{}/checkpoints", machine_url(app, id)),
        Some(json!({ "comment": comment })),
    )
    .await
}

async fn restore(d: &Daemon, app: &str, id: &str, cp: &str) -> Value {
    d.ok(
        Method::POST,
        &format!("{}/checkpoints/{cp}/restore", machine_url(app, id)),
        None,
    )
    .await
}

async fn fork(d: &Daemon, app: &str, id: &str, body: Value) -> Value {
    d.ok(Method::POST, &format!("{}/fork", machine_url(app, id)), Some(body))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_brings_back_exactly_what_was_checkpointed() {
    let d = Daemon::start();
    d.create_app("cp").await;
    let m = id(&d.machine("cp", json!({})).await);

    // Step 1: files, modes, owners, a symlink, and a file of the image
    // deleted (a whiteout over the lower layer).
    d.sh(
        "cp",
        &m,
        "mkdir -p /work/sub && echo v1 > /work/a && chmod 640 /work/a && chown 1000:1000 /work/a \
         && ln -s a /work/link && echo keep > /work/sub/k && rm /srv/app/from-image.txt",
    )
    .await;
    let step1 = tree_hash(&d, "cp", &m).await;
    let c1 = checkpoint(&d, "cp", &m, "step 1").await;
    let timing = &c1["timing"];
    assert!(timing["paused_ms"].as_f64().unwrap() > 0.0, "{c1}");
    assert!(timing["total_ms"].as_f64().unwrap() >= timing["paused_ms"].as_f64().unwrap());
    assert_eq!(c1["comment"], "step 1");
    assert!(c1.get("parent_id").is_none(), "{c1}");
    let c1 = id(&c1);

    // Step 2 breaks things: rewrites, deletes, adds, restores an image file.
    d.sh(
        "cp",
        &m,
        "echo v2 > /work/a && chmod 777 /work/a && rm /work/link && rm -r /work/sub \
         && mkdir /work/new && dd if=/dev/zero of=/work/new/big bs=1M count=5 2>/dev/null \
         && echo back > /srv/app/from-image.txt",
    )
    .await;
    assert_ne!(tree_hash(&d, "cp", &m).await, step1);

    // Restore on a running machine: stopped, rolled back, started again.
    let restored = restore(&d, "cp", &m, &c1).await;
    assert_eq!(restored["state"], "started");
    assert_eq!(tree_hash(&d, "cp", &m).await, step1);
    assert_eq!(
        d.sh("cp", &m, "cat /work/a; stat -c '%a %u' /work/a").await,
        "v1\n640 1000\n"
    );

    // A checkpoint after a restore descends from the restored one.
    d.sh("cp", &m, "echo v3 > /work/a").await;
    let step3 = tree_hash(&d, "cp", &m).await;
    let c2 = checkpoint(&d, "cp", &m, "step 3").await;
    assert_eq!(c2["parent_id"], c1.as_str());
    let c2 = id(&c2);

    // Restore on a stopped machine leaves it stopped.
    d.sh("cp", &m, "rm -rf /work").await;
    d.ok(Method::POST, &format!("{}/stop", machine_url("cp", &m)), None)
        .await;
    let restored = restore(&d, "cp", &m, &c2).await;
    assert_eq!(restored["state"], "stopped");
    d.ok(Method::POST, &format!("{}/start", machine_url("cp", &m)), None)
        .await;
    assert_eq!(tree_hash(&d, "cp", &m).await, step3);

    // A checkpoint of a stopped machine pauses nothing.
    d.ok(Method::POST, &format!("{}/stop", machine_url("cp", &m)), None)
        .await;
    let c3 = checkpoint(&d, "cp", &m, "stopped").await;
    assert_eq!(c3["timing"]["paused_ms"], 0.0);
    assert_eq!(c3["parent_id"], c2.as_str());

    // Listed oldest first; the events say what happened.
    let list = d
        .ok(Method::GET, &format!("{}/checkpoints", machine_url("cp", &m)), None)
        .await;
    let ids: Vec<&str> = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [c1.as_str(), c2.as_str(), c3["id"].as_str().unwrap()]);
    let events = d
        .ok(Method::GET, &format!("{}/events", machine_url("cp", &m)), None)
        .await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_else(|| e["kind"].as_str().unwrap()))
        .collect();
    assert!(kinds.contains(&"checkpoint") && kinds.contains(&"restore"), "{kinds:?}");

    // Deleting the middle checkpoint keeps the chain whole.
    d.ok(
        Method::DELETE,
        &format!("{}/checkpoints/{c2}", machine_url("cp", &m)),
        None,
    )
    .await;
    assert!(!d.pool_dir.join(format!("checkpoint-{c2}")).exists());
    let c3 = d
        .ok(
            Method::GET,
            &format!("{}/checkpoints/{}", machine_url("cp", &m), id(&c3)),
            None,
        )
        .await;
    assert_eq!(c3["parent_id"], c1.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn forks_are_isolated_and_outlive_what_they_came_from() {
    let d = Daemon::start();
    d.create_app("fk").await;
    let parent = id(&d.machine("fk", json!({"metadata": {"role": "parent"}})).await);
    d.sh("fk", &parent, "mkdir /work && echo base > /work/base").await;
    let cp = id(&checkpoint(&d, "fk", &parent, "base").await);
    d.sh("fk", &parent, "echo later > /work/later").await;
    let parent_now = tree_hash(&d, "fk", &parent).await;

    // A fork of the running machine: same files, same config, started.
    let f1 = fork(&d, "fk", &parent, json!({"name": "fork-one"})).await;
    assert_eq!(f1["state"], "started");
    assert_eq!(f1["name"], "fork-one");
    assert_eq!(f1["config"]["metadata"]["role"], "parent");
    let f1 = id(&f1);
    assert_eq!(tree_hash(&d, "fk", &f1).await, parent_now);

    // Isolated both ways.
    d.sh("fk", &f1, "echo fork > /work/fork-only && rm /work/base").await;
    d.sh("fk", &parent, "echo parent > /work/parent-only").await;
    assert_eq!(
        d.sh("fk", &f1, "ls /work").await,
        "fork-only\nlater\n",
        "the fork sees only its own writes"
    );
    assert_eq!(
        d.sh("fk", &parent, "ls /work").await,
        "base\nlater\nparent-only\n",
        "the parent sees only its own writes"
    );

    // From a checkpoint, created stopped.
    let f2 = fork(&d, "fk", &parent, json!({"checkpoint": cp, "skip_launch": true})).await;
    assert_eq!(f2["state"], "created");
    let f2 = id(&f2);
    d.ok(Method::POST, &format!("{}/start", machine_url("fk", &f2)), None)
        .await;
    assert_eq!(d.sh("fk", &f2, "ls /work").await, "base\n");

    // A fork of a fork, through the CLI.
    let out = d.cli(&["machine", "fork", "-a", "fk", &f1, "--name", "fork-two", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let f3 = id(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(d.sh("fk", &f3, "cat /work/fork-only").await, "fork\n");

    // Destroying the parent deletes its layer and checkpoints, and nothing
    // the forks need.
    d.ok(
        Method::DELETE,
        &format!("{}?force=true", machine_url("fk", &parent)),
        None,
    )
    .await;
    assert!(!d.pool_dir.join(format!("machine-{parent}")).exists());
    assert!(!d.pool_dir.join(format!("checkpoint-{cp}")).exists());
    assert_eq!(d.sh("fk", &f2, "cat /work/base").await, "base\n");
    assert_eq!(d.sh("fk", &f1, "cat /work/later").await, "later\n");
    d.ok(Method::POST, &format!("{}/stop", machine_url("fk", &f2)), None)
        .await;
    d.ok(Method::POST, &format!("{}/start", machine_url("fk", &f2)), None)
        .await;
    assert_eq!(d.sh("fk", &f2, "cat /work/base").await, "base\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_change_nothing() {
    let d = Daemon::start();
    d.create_app("bad").await;
    let m = id(&d.machine("bad", json!({})).await);
    let other = id(&d.machine("bad", json!({})).await);
    let theirs = id(&checkpoint(&d, "bad", &other, "theirs").await);
    let base = machine_url("bad", &m);

    let cases = [
        (
            Method::POST,
            format!("{base}/checkpoints/nope/restore"),
            None,
            StatusCode::NOT_FOUND,
        ),
        // Another machine's checkpoint is not this one's.
        (
            Method::POST,
            format!("{base}/checkpoints/{theirs}/restore"),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            format!("{base}/checkpoints/{theirs}"),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            format!("{base}/fork"),
            Some(json!({"checkpoint": theirs})),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            format!("{base}/checkpoints"),
            Some(json!({"comment": 5})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("{base}/checkpoints"),
            Some(json!({"bogus": 1})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("{base}/fork"),
            Some(json!({"name": "no spaces"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("{base}/fork"),
            Some(json!({"name": other})),
            StatusCode::CONFLICT,
        ),
        (
            Method::POST,
            "/v1/apps/bad/machines/ghost/checkpoints".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, path, body, want) in cases {
        let (status, v) = d.call(method.clone(), &path, body).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    let list = d.ok(Method::GET, "/v1/apps/bad/machines", None).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "no fork was left behind: {list}");
    let theirs_list = d
        .ok(
            Method::GET,
            &format!("{}/checkpoints", machine_url("bad", &other)),
            None,
        )
        .await;
    assert_eq!(theirs_list["checkpoints"].as_array().unwrap().len(), 1);
    let ours = d.ok(Method::GET, &format!("{base}/checkpoints"), None).await;
    assert_eq!(ours["checkpoints"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn diff_lists_what_a_step_changed() {
    let d = Daemon::start();
    d.create_app("df").await;
    let m = id(&d.machine("df", json!({})).await);
    d.sh(
        "df",
        &m,
        "mkdir /work && printf 'one\\ntwo\\nthree\\n' > /work/a && echo k > /work/keep && ln -s a /work/l \
         && ln -s /etc /work/hostlink",
    )
    .await;
    let c1 = id(&checkpoint(&d, "df", &m, "before").await);

    // The step: a rewrite, deletions (of its own files and of the image's,
    // a whole directory among them), additions, a mode change, a symlink
    // pointed elsewhere, and a directory replaced (made opaque).
    d.sh(
        "df",
        &m,
        "printf 'one\\nTWO\\nthree\\n' > /work/a && rm /work/keep && chmod 700 /work && ln -sfn keep /work/l \
         && mkdir /work/new && dd if=/dev/zero of=/work/new/big bs=1M count=5 2>/dev/null \
         && rm -r /home/alice && rm -r /srv/app && mkdir /srv/app && echo x > /srv/app/fresh",
    )
    .await;
    let url = format!("{}/checkpoints/{c1}/diff", machine_url("df", &m));
    let now = d.ok(Method::GET, &url, None).await;
    assert_eq!(now["from"], c1.as_str());
    assert_eq!(now["to"], "now");
    assert_eq!(now["truncated"], false);
    let listed: Vec<(String, String, String)> = now["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_owned();
            (s("path"), s("kind"), s("type"))
        })
        .collect();
    let want = [
        ("/home/alice", "deleted", "dir"),
        ("/srv/app/fresh", "added", "file"),
        ("/srv/app/from-image.txt", "deleted", "file"),
        ("/work", "modified", "dir"),
        ("/work/a", "modified", "file"),
        ("/work/keep", "deleted", "file"),
        ("/work/l", "modified", "symlink"),
        ("/work/new", "added", "dir"),
        ("/work/new/big", "added", "file"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(p, k, t)| (p.to_string(), k.to_string(), t.to_string()))
        .collect();
    assert_eq!(listed, want, "{now}");
    let big = now["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == "/work/new/big")
        .unwrap();
    assert_eq!(big["size"], 5 << 20);
    assert!(big.get("old_size").is_none());

    // The same between two checkpoints, and with a content diff.
    let c2 = id(&checkpoint(&d, "df", &m, "after").await);
    let between = d.ok(Method::GET, &format!("{url}?to={c2}&path=/work/a"), None).await;
    assert_eq!(between["changes"], now["changes"]);
    let text = between["content_diff"].as_str().unwrap();
    assert!(
        text.contains("--- a/work/a") && text.contains("-two\n") && text.contains("+TWO\n"),
        "{text}"
    );
    assert!(text.contains(" one\n") && !text.contains("-one"), "{text}");

    // Through the CLI.
    let out = d.cli(&["checkpoint", "diff", "-a", "df", &m, &c1, "--to", &c2]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("A /work/new/big (5.0 MB)") && text.contains("D /home/alice/"),
        "{text}"
    );

    // A path below a symlink is looked up in the machine, never on the
    // host (the machine's /work/hostlink points at /etc); bad paths and
    // files unfit for a text diff get a clear 400.
    for (path, why) in [
        ("/work/hostlink/passwd", "neither version"),
        ("/work/../etc/passwd", ".."),
        ("work/a", "absolute"),
        ("/work/new/big", "bytes"),
        ("/work/new", "not a regular file"),
    ] {
        let (status, v) = d.call(Method::GET, &format!("{url}?path={path}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        let error = v["error"].as_str().unwrap();
        assert!(error.contains(why), "{path}: {error}");
        assert!(!error.contains("root:x:0:0"), "{error}");
    }
    let (status, _) = d.call(Method::GET, &format!("{url}?to=nope"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = d.call(Method::GET, &format!("{url}?bogus=1"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Nothing is left mounted or snapshotted by the diffs.
    assert_eq!(std::fs::read_dir(d.data_dir.path().join("tmp")).unwrap().count(), 0);
    let scratch = std::fs::read_dir(&d.pool_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("scratch-")
        })
        .count();
    assert_eq!(scratch, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_runs_again_as_a_machine_with_its_recipe() {
    let d = Daemon::start();
    d.create_app("ex").await;
    let m = id(&d.machine("ex", json!({"env": {"FROM_CONFIG": "yes"}})).await);
    d.sh("ex", &m, "mkdir /app && echo hi > /app/x && rm /srv/app/from-image.txt")
        .await;
    let c1 = id(&checkpoint(&d, "ex", &m, "app built").await);
    d.sh("ex", &m, "echo later > /app/y").await;

    let export = |body: Value| {
        let url = format!("{}/export", machine_url("ex", &m));
        let d = &d;
        async move { d.call(Method::POST, &url, Some(body)).await }
    };
    let (status, now) = export(json!({"name": "built"})).await;
    assert_eq!(status, StatusCode::OK, "{now}");
    assert_eq!(
        now["layers"], 2,
        "the base image's layer and one of the machine's changes"
    );
    let recipe = now["recipe"].as_str().unwrap();
    assert!(recipe.contains("FROM oci:"), "{recipe}");
    assert!(
        recipe.contains(r#"RUN ["sh","-c","mkdir /app && echo hi > /app/x && rm /srv/app/from-image.txt"]"#),
        "{recipe}"
    );
    assert!(recipe.contains("echo later > /app/y"), "{recipe}");
    assert_eq!(
        std::fs::read_to_string(now["recipe_path"].as_str().unwrap()).unwrap(),
        recipe
    );

    // The exported image runs as a machine: the changes, the deletion and
    // the machine's environment are in it.
    let image = now["image"].as_str().unwrap();
    let again = d
        .ok(
            Method::POST,
            "/v1/apps/ex/machines",
            Some(json!({"config": {"image": image}})),
        )
        .await;
    assert_eq!(again["state"], "started");
    let again = id(&again);
    assert_eq!(
        d.sh("ex", &again, "cat /app/x /app/y; ls /srv/app; echo $FROM_CONFIG")
            .await,
        "hi\nlater\nyes\n"
    );

    // At a checkpoint: what it held then, and the steps up to it.
    let (status, at) = export(json!({"name": "built", "tag": "step1", "checkpoint": c1})).await;
    assert_eq!(status, StatusCode::OK, "{at}");
    assert!(!at["recipe"].as_str().unwrap().contains("echo later"));
    let older = d
        .ok(
            Method::POST,
            "/v1/apps/ex/machines",
            Some(json!({"config": {"image": at["image"]}})),
        )
        .await;
    assert_eq!(d.sh("ex", &id(&older), "cat /app/x; ls /app").await, "hi\nx\n");

    // A rollback undoes the steps after the checkpoint in the recipe too.
    restore(&d, "ex", &m, &c1).await;
    let (_, rolled) = export(json!({"name": "rolled"})).await;
    assert!(!rolled["recipe"].as_str().unwrap().contains("echo later"), "{rolled}");

    for body in [
        json!({"name": "../escape"}),
        json!({"name": "ok", "tag": "a/b"}),
        json!({"name": "ok", "checkpoint": "nope"}),
        json!({"name": "ok", "bogus": 1}),
    ] {
        let (status, v) = export(body.clone()).await;
        assert!(status.is_client_error(), "{body}: {status} {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    assert!(!d.data_dir.path().join("exports/ok").exists());
}

/// One layer per checkpoint: each holds what its step changed, deletions
/// included (a file made in one step and deleted in the next must stay
/// deleted, which stacking the cumulative uppers would get wrong).
#[tokio::test(flavor = "multi_thread")]
async fn an_export_can_have_a_layer_per_checkpoint() {
    let d = Daemon::start();
    d.create_app("lay").await;
    let m = id(&d.machine("lay", json!({})).await);
    d.sh("lay", &m, "mkdir /app && echo a > /app/a && echo g > /app/gone")
        .await;
    checkpoint(&d, "lay", &m, "one").await;
    d.sh(
        "lay",
        &m,
        "rm /app/gone && echo b > /app/b && mkdir -p /app/dir && echo x > /app/dir/x && rm /srv/app/from-image.txt",
    )
    .await;
    let c2 = id(&checkpoint(&d, "lay", &m, "two").await);
    d.sh("lay", &m, "rm -r /app/dir && echo a2 > /app/a").await;

    let url = format!("{}/export", machine_url("lay", &m));
    let now = d
        .ok(
            Method::POST,
            &url,
            Some(json!({"name": "layered", "layers": "checkpoints"})),
        )
        .await;
    assert_eq!(
        now["layers"], 4,
        "the image's layer, then one per checkpoint and one since: {now}"
    );
    let at_c2 = d
        .ok(
            Method::POST,
            &url,
            Some(json!({"name": "layered", "tag": "two", "layers": "checkpoints", "checkpoint": c2})),
        )
        .await;
    assert_eq!(at_c2["layers"], 3);

    let run = |image: Value| {
        let d = &d;
        async move {
            let m = d
                .ok(
                    Method::POST,
                    "/v1/apps/lay/machines",
                    Some(json!({"config": {"image": image}})),
                )
                .await;
            id(&m)
        }
    };
    let listing = "ls /app /srv/app; cat /app/a; test -e /app/gone && echo gone-is-back; true";
    let again = run(now["image"].clone()).await;
    assert_eq!(d.sh("lay", &again, listing).await, "/app:\na\nb\n\n/srv/app:\na2\n");
    let older = run(at_c2["image"].clone()).await;
    assert_eq!(
        d.sh("lay", &older, &format!("{listing}; cat /app/dir/x")).await,
        "/app:\na\nb\ndir\n\n/srv/app:\na\nx\n"
    );
}
