use super::*;
use hangar_api::MachineConfig;

fn machine(id: &str, name: &str) -> MachineRecord {
    MachineRecord {
        id: id.into(),
        app: "a".into(),
        name: name.into(),
        state: MachineState::Created,
        config: MachineConfig {
            image: "oci:/x".into(),
            ..Default::default()
        },
        image_reference: "oci:/x".into(),
        image_digest: "sha256:00".into(),
        instance_id: "i1".into(),
        host: "h".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
        run_ms: 0,
        started_at_ms: None,
        restart_count: 0,
        last_exit: None,
        base_checkpoint: None,
    }
}

fn event(kind: &str) -> MachineEvent {
    MachineEvent {
        kind: kind.into(),
        status: "created".into(),
        source: "user".into(),
        timestamp: 5,
        detail: Some(serde_json::json!({"k": 1})),
    }
}

#[tokio::test]
async fn machines_round_trip_and_names_are_unique_among_the_living() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    store.create_app("a", 1).await.unwrap();
    assert!(matches!(store.create_app("a", 2).await, Err(StoreError::Conflict(_))));

    let mut m = machine("m1", "web");
    store.insert_machine(&m, &event("create")).await.unwrap();
    assert!(matches!(
        store.insert_machine(&machine("m2", "web"), &event("create")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_machine("m1").await.unwrap().unwrap(), m);

    m.state = MachineState::Destroyed;
    store.update_machine(&m, Some(&event("destroy"))).await.unwrap();
    store
        .insert_machine(&machine("m2", "web"), &event("create"))
        .await
        .unwrap();
    assert_eq!(store.list_machines(Some("a")).await.unwrap().len(), 2);
    let events = store.list_events("m1").await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["create", "destroy"]
    );
    assert_eq!(events[0].detail, Some(serde_json::json!({"k": 1})));

    assert!(matches!(store.delete_app("a").await, Err(StoreError::Conflict(_))));
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let store = Store::open(&path).await.unwrap();
        store.create_app("a", 1).await.unwrap();
        store
            .insert_machine(&machine("m1", "x"), &event("create"))
            .await
            .unwrap();
        store.put_setting("host", "h1").await.unwrap();
    }
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.get_machine("m1").await.unwrap().unwrap().name, "x");
    assert_eq!(store.get_setting("host").await.unwrap().as_deref(), Some("h1"));
    store.purge_machine("m1").await.unwrap();
    store.delete_app("a").await.unwrap();
    assert!(store.get_app("a").await.unwrap().is_none());
}

#[tokio::test]
async fn updating_a_missing_machine_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    store.create_app("a", 1).await.unwrap();
    let ghost = machine("ghost", "g");
    assert!(matches!(
        store.update_machine(&ghost, Some(&event("stop"))).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.list_events("ghost").await.unwrap().is_empty());
    // And a real one gets exactly one event per update.
    let m = machine("m1", "x");
    store.insert_machine(&m, &event("create")).await.unwrap();
    store.update_machine(&m, Some(&event("start"))).await.unwrap();
    store.update_machine(&m, None).await.unwrap();
    assert_eq!(store.list_events("m1").await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_all_land_in_order_per_machine() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    store.create_app("a", 1).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let m = machine(&format!("m{i}"), &format!("n{i}"));
            store.insert_machine(&m, &event("create")).await.unwrap();
            for _ in 0..20 {
                store.update_machine(&m, Some(&event("update"))).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(store.list_machines(Some("a")).await.unwrap().len(), 8);
    for i in 0..8 {
        assert_eq!(store.list_events(&format!("m{i}")).await.unwrap().len(), 21);
    }
}

#[tokio::test]
async fn volumes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    store.create_app("a", 1).await.unwrap();
    let v = VolumeRecord {
        id: "v1".into(),
        app: "a".into(),
        name: "data".into(),
        size_gb: 3,
        attached_machine_id: None,
        created_at_ms: 5,
        deleted_at_ms: None,
    };
    store.insert_volume(&v).await.unwrap();
    let listed = store.list_volumes(None).await.map_err(|e| format!("{e:?}")).unwrap();
    assert_eq!(listed, vec![v.clone()]);
    assert!(matches!(
        store
            .insert_volume(&VolumeRecord {
                id: "v2".into(),
                ..v.clone()
            })
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(store.delete_app("a").await, Err(StoreError::Conflict(_))));
}

#[tokio::test]
async fn a_machine_keeps_only_its_newest_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    store.create_app("a", 1).await.unwrap();
    store
        .insert_machine(&machine("m1", "loop"), &event("create"))
        .await
        .unwrap();
    store
        .insert_machine(&machine("m2", "calm"), &event("create"))
        .await
        .unwrap();
    // Interleaved with another machine's, as two crash loops would be.
    for i in 0..(MAX_EVENTS_PER_MACHINE + 500) {
        let mut e = event("exit");
        e.timestamp = i;
        store.add_event("m1", &e).await.unwrap();
        store.add_event("m2", &e).await.unwrap();
    }
    let events = store.list_events("m1").await.unwrap();
    assert!(
        events.len() as i64 <= MAX_EVENTS_PER_MACHINE + 64,
        "{} kept",
        events.len()
    );
    assert_eq!(
        events.last().unwrap().timestamp,
        MAX_EVENTS_PER_MACHINE + 499,
        "the newest stay"
    );
    let other = store.list_events("m2").await.unwrap().len() as i64;
    assert!(other <= MAX_EVENTS_PER_MACHINE + 64, "{other} kept");
}
