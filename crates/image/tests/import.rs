//! Integration tests of the image store. They need root (owners, device
//! nodes, trusted xattrs) and skip with a message otherwise.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use hangar_image::{ImageConfig, ImageError, ImageLimits, ImageRef, ImageStore, write_oci_layout};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

// ---------------------------------------------------------------- helpers

fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping: image import tests need root (owners, device nodes, trusted.* xattrs)");
    false
}

macro_rules! require_root {
    () => {
        if !is_root() {
            return;
        }
    };
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

fn parse(s: &str) -> ImageRef {
    s.parse().unwrap()
}

fn oci_ref(dir: &Path, tag: Option<&str>) -> ImageRef {
    match tag {
        Some(t) => parse(&format!("oci:{}:{t}", dir.display())),
        None => parse(&format!("oci:{}", dir.display())),
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// Builds tars entry by entry, including hostile ones the tar crate's own
/// path setters refuse (`..`, absolute).
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(ty: EntryType, path: &str, mode: u32) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        let name = &mut h.as_old_mut().name;
        assert!(path.len() < name.len());
        name[..path.len()].copy_from_slice(path.as_bytes());
        h
    }

    fn raw(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.raw(Self::header(EntryType::Directory, path, 0o755), b"")
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.raw(Self::header(EntryType::Regular, path, 0o644), data)
    }

    fn link(&mut self, ty: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(ty, path, 0o777);
        let slot = &mut h.as_old_mut().linkname;
        slot[..target.len()].copy_from_slice(target.as_bytes());
        self.raw(h, b"")
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target)
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

#[derive(Clone, Copy)]
enum Comp {
    Plain,
    Gzip,
    Zstd,
}

/// Writes raw OCI layouts by hand, for what `write_oci_layout` never makes.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir: dir.into() }
    }

    fn blob(&self, bytes: &[u8]) -> String {
        let d = sha(bytes);
        fs::write(self.dir.join("blobs/sha256").join(hex_of(&d)), bytes).unwrap();
        d
    }

    fn json(&self, media_type: &str, v: &Value) -> Value {
        let bytes = serde_json::to_vec(v).unwrap();
        let digest = self.blob(&bytes);
        json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    }

    /// A layer blob: its descriptor and diff_id.
    fn layer(&self, tar: &[u8], comp: Comp, media_type: Option<&str>) -> (Value, String) {
        let (bytes, mt) = match comp {
            Comp::Plain => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(tar).unwrap();
                (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            Comp::Zstd => (
                zstd::encode_all(tar, 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let digest = self.blob(&bytes);
        (
            json!({"mediaType": media_type.unwrap_or(mt), "digest": digest, "size": bytes.len()}),
            sha(tar),
        )
    }

    /// An image manifest over `layers`; returns the manifest descriptor.
    fn image(&self, layers: &[(Value, String)], arch: &str, docker: bool) -> Value {
        let diff_ids: Vec<&String> = layers.iter().map(|(_, d)| d).collect();
        let (mt_config, mt_manifest) = if docker {
            (
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
        } else {
            (
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.manifest.v1+json",
            )
        };
        let config = self.json(
            mt_config,
            &json!({
                "architecture": arch, "os": "linux",
                "config": {"Cmd": ["/bin/sh"], "Env": null, "Labels": {"arch": arch}},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }),
        );
        let layers: Vec<&Value> = layers.iter().map(|(d, _)| d).collect();
        self.json(
            mt_manifest,
            &json!({"schemaVersion": 2, "mediaType": mt_manifest, "config": config, "layers": layers}),
        )
    }

    fn index(&self, entries: &[(Value, Option<&str>)]) {
        let manifests: Vec<Value> = entries
            .iter()
            .map(|(d, tag)| {
                let mut d = d.clone();
                if let Some(t) = tag {
                    d["annotations"] = json!({"org.opencontainers.image.ref.name": t});
                }
                d
            })
            .collect();
        let idx =
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&idx).unwrap()).unwrap();
    }
}

fn single_layer_layout(dir: &Path, tar: &[u8], tag: &str) -> Layout {
    let l = Layout::new(dir);
    let layer = l.layer(tar, Comp::Gzip, None);
    let m = l.image(&[layer], "amd64", false);
    l.index(&[(m, Some(tag))]);
    l
}

fn assert_store_clean(store: &ImageStore) {
    assert!(list(&store.root().join("tmp")).is_empty(), "tmp/ not empty");
}

// ---------------------------------------------------------------- tests

#[test]
fn write_then_import_round_trips_metadata() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::create_dir_all(rootfs.join("etc/conf.d")).unwrap();
    fs::create_dir_all(rootfs.join("dev")).unwrap();
    fs::write(rootfs.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(rootfs.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(rootfs.join("etc/conf.d/a"), b"a=1\n").unwrap();
    rustix::fs::chown(
        rootfs.join("etc/conf.d/a").as_path(),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(2000)),
    )
    .unwrap();
    fs::hard_link(rootfs.join("etc/conf.d/a"), rootfs.join("etc/a-link")).unwrap();
    std::os::unix::fs::symlink("/bin/tool", rootfs.join("bin/abs-link")).unwrap();
    std::os::unix::fs::symlink("tool", rootfs.join("bin/rel-link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        rootfs.join("dev/null").as_path(),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    // mknod is subject to the umask.
    fs::set_permissions(rootfs.join("dev/null"), fs::Permissions::from_mode(0o666)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        rootfs.join("dev/fifo").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    rustix::fs::setxattr(
        rootfs.join("bin/tool").as_path(),
        "user.hangar",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mtime = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 1_234_567_890,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 1_234_567_890,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        rootfs.join("etc/conf.d").as_path(),
        &mtime,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();

    let config = ImageConfig {
        entrypoint: vec!["/bin/tool".into()],
        cmd: vec!["--flag".into()],
        env: vec!["PATH=/bin".into(), "A=b".into()],
        working_dir: Some("/etc".into()),
        user: Some("1000:2000".into()),
        exposed_ports: vec!["80/tcp".into(), "9000/udp".into()],
        labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
    };
    let layout = t.path().join("layout");
    let digest = write_oci_layout(&layout, "v1", &rootfs, &config).unwrap();
    // Deterministic: same tree, same digest.
    let layout2 = t.path().join("layout2");
    assert_eq!(write_oci_layout(&layout2, "v1", &rootfs, &config).unwrap(), digest);

    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let image = store.import(&oci_ref(&layout, Some("v1"))).unwrap();
    assert_eq!(image.manifest_digest, digest);
    assert_eq!(image.reference, format!("oci:{}:v1", layout.display()));
    assert_eq!(image.config, config);
    assert_eq!(image.layers.len(), 1);
    let layer = &image.layers[0];
    assert_eq!(layer.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
    for d in [&digest, &layer.digest] {
        assert!(store.root().join("blobs/sha256").join(hex_of(d)).is_file());
    }
    assert_eq!(fs::metadata(store.blob_path(&layer.digest)).unwrap().len(), layer.size);
    let dirs = store.layer_dirs(&image);
    assert_eq!(dirs, vec![store.layer_path(&layer.diff_id)]);
    let l = &dirs[0];

    let tool = fs::symlink_metadata(l.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(fs::read(l.join("bin/tool")).unwrap(), b"#!/bin/sh\necho tool\n");
    assert_eq!(xattr(&l.join("bin/tool"), "user.hangar").as_deref(), Some(&b"kept"[..]));
    let a = fs::symlink_metadata(l.join("etc/conf.d/a")).unwrap();
    assert_eq!((a.uid(), a.gid()), (1000, 2000));
    let link = fs::symlink_metadata(l.join("etc/a-link")).unwrap();
    assert_eq!(link.ino(), a.ino(), "hard link kept");
    assert_eq!(fs::read_link(l.join("bin/abs-link")).unwrap(), Path::new("/bin/tool"));
    assert_eq!(fs::read_link(l.join("bin/rel-link")).unwrap(), Path::new("tool"));
    let null = fs::symlink_metadata(l.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    // A device node is root's alone on the host, whatever the image says.
    assert_eq!(null.mode() & 0o7777, 0o600);
    assert!(fs::symlink_metadata(l.join("dev/fifo")).unwrap().file_type().is_fifo());
    assert_eq!(
        fs::symlink_metadata(l.join("etc/conf.d")).unwrap().mtime(),
        1_234_567_890,
        "directory mtime kept"
    );
    assert_eq!(
        fs::symlink_metadata(l).unwrap().mode() & 0o7777,
        0o755,
        "layer root is 0755"
    );

    // Importing again reuses everything.
    let again = store.import(&oci_ref(&layout, None)).unwrap();
    assert_eq!(again.layers, image.layers);
    assert_store_clean(&store);
}

#[test]
fn written_layers_carry_overlay_whiteouts() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    // An overlay upper directory: a whiteout device and an opaque directory.
    let upper = t.path().join("upper");
    fs::create_dir_all(upper.join("opaque")).unwrap();
    fs::write(upper.join("opaque/new"), b"new").unwrap();
    rustix::fs::setxattr(
        upper.join("opaque").as_path(),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        upper.join("deleted").as_path(),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .unwrap();
    let layout = t.path().join("layout");
    write_oci_layout(&layout, "t", &upper, &ImageConfig::default()).unwrap();

    // The layer holds OCI whiteouts, not overlay ones.
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(hex_of(m))).unwrap()).unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(hex_of(manifest["layers"][0]["digest"].as_str().unwrap()));
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(fs::File::open(blob).unwrap()));
    for e in archive.entries().unwrap() {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    assert_eq!(names, [".wh.deleted", "opaque", "opaque/.wh..wh..opq", "opaque/new"]);

    // And importing it gives the overlay form back.
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let image = store.import(&oci_ref(&layout, None)).unwrap();
    let l = &store.layer_dirs(&image)[0];
    let deleted = fs::symlink_metadata(l.join("deleted")).unwrap();
    assert!(deleted.file_type().is_char_device() && deleted.rdev() == 0);
    assert_eq!(
        xattr(&l.join("opaque"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(list(&l.join("opaque")), ["new"]);
}

#[test]
fn skopeo_reads_written_layouts() {
    require_root!();
    if Command::new("skopeo").arg("--version").output().is_err() {
        eprintln!("skipping: skopeo is not on PATH");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/hostname"), b"hangar\n").unwrap();
    let layout = t.path().join("layout");
    let d1 = write_oci_layout(&layout, "one", &rootfs, &ImageConfig::default()).unwrap();
    fs::write(rootfs.join("etc/two"), b"2").unwrap();
    let d2 = write_oci_layout(&layout, "two", &rootfs, &ImageConfig::default()).unwrap();

    for (tag, digest) in [("one", &d1), ("two", &d2)] {
        let out = Command::new("skopeo")
            .args(["inspect", &format!("oci:{}:{tag}", layout.display())])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["Digest"], json!(digest));
        assert_eq!(v["Architecture"], "amd64");
        assert_eq!(v["Os"], "linux");
    }

    // An archive written by skopeo imports like the layout it came from.
    let archive = t.path().join("img.tar");
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            &format!("oci:{}:two", layout.display()),
            &format!("oci-archive:{}:two", archive.display()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let image = store
        .import(&parse(&format!("oci-archive:{}", archive.display())))
        .unwrap();
    assert_eq!(fs::read(store.layer_dirs(&image)[0].join("etc/two")).unwrap(), b"2");
    assert_store_clean(&store);

    // Docker v2 schema 2 manifests, converted by skopeo.
    let docker = t.path().join("docker");
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--format",
            "v2s2",
            &format!("oci:{}:one", layout.display()),
            &format!("oci:{}:d", docker.display()),
        ])
        .output()
        .unwrap();
    if out.status.success() {
        let image = store.import(&oci_ref(&docker, Some("d"))).unwrap();
        assert_eq!(
            image.layers[0].media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
    } else {
        eprintln!(
            "note: this skopeo cannot write v2s2 into an OCI layout: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn whiteouts_opaque_dirs_and_all_compressions() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let l = Layout::new(&t.path().join("layout"));
    let base = Tar::new()
        .dir("a")
        .file("a/x", b"x")
        .file("a/y", b"y")
        .dir("b")
        .file("b/keep", b"keep")
        .file("c", b"c")
        .file("foo/old", b"old")
        .file("f2", b"lower")
        .file("g/old", b"old")
        .finish();
    let top = Tar::new()
        .file(".wh.c", b"")
        .file("a/.wh.x", b"")
        .dir("b")
        .file("b/.wh..wh..opq", b"")
        .file("b/new", b"new")
        .file(".wh..wh.plnk", b"")
        // A whiteout whose parent the tar never lists.
        .file("deep/er/.wh.gone", b"")
        // Whiteouts of names this same layer also has: per the OCI spec
        // they hide only the lower layers' versions, in either order.
        .file(".wh.foo", b"")
        .file("foo/bar", b"bar")
        .file(".wh.f2", b"")
        .file("f2", b"upper")
        .file("g/x", b"x")
        .file(".wh.g", b"")
        .finish();
    let extra = Tar::new().file("d", b"d").finish();
    let layers = [
        l.layer(&base, Comp::Plain, None),
        l.layer(&top, Comp::Gzip, None),
        l.layer(&extra, Comp::Zstd, None),
    ];
    let m = l.image(&layers, "amd64", false);
    l.index(&[(m, None)]);

    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let image = store.import(&oci_ref(&l.dir, None)).unwrap();
    let dirs = store.layer_dirs(&image);
    assert_eq!(dirs.len(), 3);
    // Top-most first.
    assert_eq!(dirs[0], store.layer_path(&layers[2].1));
    assert_eq!(dirs[2], store.layer_path(&layers[0].1));
    let (top_dir, base_dir) = (&dirs[1], &dirs[2]);

    for wh in ["c", "a/x", "deep/er/gone"] {
        let md = fs::symlink_metadata(top_dir.join(wh)).unwrap();
        assert!(md.file_type().is_char_device(), "{wh} is a whiteout device");
        assert_eq!(md.rdev(), 0, "{wh} is 0:0");
    }
    assert_eq!(
        xattr(&top_dir.join("b"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&base_dir.join("b"), "trusted.overlay.opaque"), None);
    assert_eq!(
        list(top_dir),
        ["a", "b", "c", "deep", "f2", "foo", "g"],
        "no .wh. files left"
    );
    assert_eq!(list(&top_dir.join("a")), ["x"]);
    assert_eq!(list(&top_dir.join("b")), ["new"]);
    for opaque in ["foo", "g"] {
        assert_eq!(
            xattr(&top_dir.join(opaque), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "{opaque}"
        );
    }
    assert_eq!(fs::read(top_dir.join("f2")).unwrap(), b"upper");
    assert_eq!(fs::read(dirs[0].join("d")).unwrap(), b"d");
    assert_eq!(list(base_dir), ["a", "b", "c", "f2", "foo", "g"]);

    // The real test: overlayfs sees the image the layers describe.
    let merged = t.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let lower: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let opts = std::ffi::CString::new(format!("lowerdir={}", lower.join(":"))).unwrap();
    match rustix::mount::mount(
        "overlay",
        &merged,
        "overlay",
        rustix::mount::MountFlags::RDONLY,
        opts.as_c_str(),
    ) {
        Ok(()) => {
            let seen = (
                list(&merged),
                list(&merged.join("a")),
                list(&merged.join("b")),
                list(&merged.join("foo")),
                list(&merged.join("g")),
                fs::read(merged.join("f2")),
            );
            rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::DETACH).unwrap();
            assert_eq!(seen.0, ["a", "b", "d", "deep", "f2", "foo", "g"]);
            assert_eq!(seen.1, ["y"]);
            assert_eq!(seen.2, ["new"]);
            assert_eq!(seen.3, ["bar"]);
            assert_eq!(seen.4, ["x"]);
            assert_eq!(seen.5.unwrap(), b"upper");
        }
        Err(e) => eprintln!("note: overlay mount unavailable ({e}); checked the layers only"),
    }
    assert_store_clean(&store);
}

#[test]
fn symlink_in_parent_cannot_escape() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let victim = t.path().join("victim");
    fs::create_dir(&victim).unwrap();
    let etc_probe = format!("hangar-escape-test-{}", std::process::id());
    let store = ImageStore::open(&t.path().join("store")).unwrap();

    let cases = [
        // Absolute symlink to a host directory, then a file beneath it.
        Tar::new()
            .symlink("a", victim.to_str().unwrap())
            .file("a/pwned", b"x")
            .finish(),
        // The classic: a -> /etc, then a/<file>.
        Tar::new()
            .symlink("a", "/etc")
            .file(&format!("a/{etc_probe}"), b"x")
            .finish(),
        // Relative climb through a symlink.
        Tar::new()
            .symlink("up", "../../../../../../../../..")
            .file(&format!("up{}/pwned", victim.display()), b"x")
            .finish(),
        // Nested: a directory symlink inside a symlinked directory.
        Tar::new()
            .dir("d")
            .symlink("d/e", "/")
            .file(&format!("d/e{}/pwned", victim.display()), b"x")
            .finish(),
    ];
    for (i, tar) in cases.iter().enumerate() {
        let dir = t.path().join(format!("layout{i}"));
        single_layer_layout(&dir, tar, "t");
        let r = store.import(&oci_ref(&dir, None));
        assert!(list(&victim).is_empty(), "case {i}: wrote into the host directory");
        assert!(
            !Path::new("/etc").join(&etc_probe).exists(),
            "case {i}: wrote into /etc"
        );
        assert_store_clean(&store);
        match (i, r) {
            // The symlink's target does not exist in the layer, so the entry
            // has nowhere to go.
            (0 | 1, Err(ImageError::Invalid { reason, .. })) => {
                assert!(reason.contains("resolving directory \"a\""), "case {i}: {reason}")
            }
            (0 | 1, other) => panic!("case {i}: expected an error, got {other:?}"),
            // The symlink leads to the layer's own root (as in a chroot), and
            // the missing directories are made there.
            (_, Ok(image)) => {
                let layer = &store.layer_dirs(&image)[0];
                let inside = layer.join(victim.strip_prefix("/").unwrap()).join("pwned");
                assert!(inside.is_file(), "case {i}: {} missing", inside.display());
            }
            (_, Err(e)) => panic!("case {i}: {e}"),
        }
    }
    assert_eq!(list(&store.root().join("layers")).len(), 2);

    // When the target exists inside the layer, the entry lands there, as in a
    // chroot of the layer, and the host is untouched.
    let before = fs::read("/etc/passwd").unwrap();
    let tar = Tar::new()
        .dir("etc")
        .symlink("a", "/etc")
        .file("a/passwd", b"root::0:0::/:/bin/sh\n")
        .hardlink("b", "/a/passwd")
        .finish();
    let dir = t.path().join("inside");
    single_layer_layout(&dir, &tar, "t");
    let image = store.import(&oci_ref(&dir, None)).unwrap();
    let layer = &store.layer_dirs(&image)[0];
    assert_eq!(fs::read(layer.join("etc/passwd")).unwrap(), b"root::0:0::/:/bin/sh\n");
    assert_eq!(
        fs::symlink_metadata(layer.join("b")).unwrap().ino(),
        fs::symlink_metadata(layer.join("etc/passwd")).unwrap().ino()
    );
    assert_eq!(fs::read("/etc/passwd").unwrap(), before);
}

#[test]
fn dotdot_and_absolute_paths() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();

    let dir = t.path().join("dotdot");
    single_layer_layout(&dir, &Tar::new().file("a/../../evil", b"x").finish(), "t");
    match store.import(&oci_ref(&dir, None)) {
        Err(ImageError::UnsafePath { path, reason, .. }) => {
            assert_eq!(path, "a/../../evil");
            assert!(reason.contains(".."), "{reason}");
        }
        other => panic!("expected UnsafePath, got {other:?}"),
    }
    assert!(!t.path().join("evil").exists());
    assert!(list(&store.root().join("layers")).is_empty());

    // A leading '/' is dropped: the entry stays in the layer.
    let dir = t.path().join("abs");
    single_layer_layout(&dir, &Tar::new().file("/abs/file", b"x").finish(), "t");
    let image = store.import(&oci_ref(&dir, None)).unwrap();
    assert!(store.layer_dirs(&image)[0].join("abs/file").is_file());
    assert_store_clean(&store);
}

#[test]
fn hardlinks_cannot_reach_outside() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    // A host file on the same filesystem as the store, so a link would work
    // if it were attempted.
    let host = t.path().join("host-secret");
    fs::write(&host, b"secret").unwrap();
    let host_str = host.to_str().unwrap();
    let nlink = || fs::metadata(&host).unwrap().nlink();

    let cases = [
        Tar::new().hardlink("h", host_str).finish(),
        Tar::new().hardlink("h", "../../../../../../../etc/passwd").finish(),
        Tar::new()
            .symlink("s", t.path().to_str().unwrap())
            .hardlink("h", "s/host-secret")
            .finish(),
        Tar::new().hardlink("h", "/etc/passwd").finish(),
    ];
    for (i, tar) in cases.iter().enumerate() {
        let dir = t.path().join(format!("layout{i}"));
        single_layer_layout(&dir, tar, "t");
        assert!(store.import(&oci_ref(&dir, None)).is_err(), "case {i}");
        assert_eq!(nlink(), 1, "case {i}: linked the host file");
        assert!(list(&store.root().join("layers")).is_empty(), "case {i}");
        assert_store_clean(&store);
    }

    // A hard link to a symlink links the symlink itself, not its target.
    let dir = t.path().join("to-symlink");
    single_layer_layout(
        &dir,
        &Tar::new().symlink("s", host_str).hardlink("h", "s").finish(),
        "t",
    );
    let image = store.import(&oci_ref(&dir, None)).unwrap();
    let h = fs::symlink_metadata(store.layer_dirs(&image)[0].join("h")).unwrap();
    assert!(h.file_type().is_symlink());
    assert_eq!(nlink(), 1);
}

#[test]
fn corrupt_blobs_leave_nothing_behind() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    fs::write(rootfs.join("big"), vec![7u8; 100_000]).unwrap();
    let layout = t.path().join("layout");
    write_oci_layout(&layout, "t", &rootfs, &ImageConfig::default()).unwrap();
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(hex_of(&manifest_digest))).unwrap()).unwrap();
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let layer_path = layout.join("blobs/sha256").join(hex_of(&layer_digest));
    let good = fs::read(&layer_path).unwrap();

    // Flip one byte in the middle of the compressed layer.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    fs::write(&layer_path, &bad).unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    match store.import(&oci_ref(&layout, None)) {
        Err(ImageError::DigestMismatch { what, expected, actual }) => {
            assert!(what.contains(&layer_digest), "{what}");
            assert_eq!(expected, layer_digest);
            assert_eq!(actual, sha(&bad));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(list(&store.root().join("layers")).is_empty());
    assert!(list(&store.root().join("blobs/sha256")).is_empty());
    assert_store_clean(&store);

    // Truncated: refused before a byte is unpacked, for its size.
    fs::write(&layer_path, &good[..good.len() - 10]).unwrap();
    match store.import(&oci_ref(&layout, None)) {
        Err(ImageError::Invalid { reason, .. }) => assert!(reason.contains("descriptor says"), "{reason}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(list(&store.root().join("blobs/sha256")).is_empty());

    // A corrupt config.
    fs::write(&layer_path, &good).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let config_path = layout.join("blobs/sha256").join(hex_of(&config_digest));
    let mut config = fs::read(&config_path).unwrap();
    config[1] = b' ';
    fs::write(&config_path, &config).unwrap();
    match store.import(&oci_ref(&layout, None)) {
        Err(ImageError::DigestMismatch { what, .. }) => assert!(what.contains("config"), "{what}"),
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(list(&store.root().join("blobs/sha256")).is_empty());
    assert!(list(&store.root().join("layers")).is_empty());
    assert_store_clean(&store);
}

#[test]
fn wrong_diff_id_keeps_nothing() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let l = Layout::new(&t.path().join("layout"));
    let tar = Tar::new().file("f", b"f").finish();
    let (desc, _) = l.layer(&tar, Comp::Gzip, None);
    let wrong = sha(b"something else");
    let m = l.image(&[(desc.clone(), wrong.clone())], "amd64", false);
    l.index(&[(m, None)]);
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    match store.import(&oci_ref(&l.dir, None)) {
        Err(ImageError::DigestMismatch { what, expected, actual }) => {
            assert!(what.contains("diff_id"), "{what}");
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha(&tar));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(list(&store.root().join("layers")).is_empty());
    assert!(list(&store.root().join("blobs/sha256")).is_empty());
    assert_store_clean(&store);
}

/// One PAX extended header's records.
fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        // The length counts its own digits.
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        out.extend(format!("{len}{body}").into_bytes());
    }
    out
}

#[test]
fn oversized_layers_bombs_and_sparse_files_are_refused() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();

    // A gzip bomb: 200 MiB of zeros in a layer of some hundred KiB.
    let bomb = Tar::new().file("zeros", &vec![0u8; 200 << 20]).finish();
    let dir = t.path().join("bomb");
    single_layer_layout(&dir, &bomb, "t");
    match store.import(&oci_ref(&dir, None)) {
        Err(ImageError::TooLarge { reason, .. }) => assert!(reason.contains("--image-max-ratio"), "{reason}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(list(&store.root().join("layers")).is_empty());
    assert_store_clean(&store);

    // A layer over the size limit is refused before a byte of it is read.
    let small = ImageStore::open(&t.path().join("small"))
        .unwrap()
        .with_limits(ImageLimits {
            max_layer_bytes: 10,
            ..Default::default()
        });
    let dir = t.path().join("big");
    single_layer_layout(&dir, &Tar::new().file("f", &[7u8; 4096]).finish(), "t");
    match small.import(&oci_ref(&dir, None)) {
        Err(ImageError::TooLarge { reason, .. }) => assert!(reason.contains("--image-max-layer-gb"), "{reason}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(list(&small.root().join("blobs/sha256")).is_empty());

    // An old-style GNU sparse file is unpacked whole, holes and all: a tar
    // of a few blocks that claims 1 GiB stops at the limit.
    let mut h = Tar::header(EntryType::GNUSparse, "holes", 0o644);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.set_real_size(1 << 30);
    gnu.sparse[0].set_offset((1 << 30) - 1);
    gnu.sparse[0].set_length(1);
    let holes = Tar::new().raw(h, b"x").finish();
    let dir = t.path().join("holes");
    single_layer_layout(&dir, &holes, "t");
    match store.import(&oci_ref(&dir, None)) {
        Err(ImageError::TooLarge { reason, .. }) => assert!(reason.contains("files hold more"), "{reason}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_store_clean(&store);

    // A sparse file in GNU's PAX format is refused, not unpacked as its map.
    let mut tar = Tar::new();
    let sparse = [
        ("GNU.sparse.major", "1"),
        ("GNU.sparse.minor", "0"),
        ("GNU.sparse.name", "big"),
        ("GNU.sparse.realsize", "1048576"),
    ];
    tar.raw(Tar::header(EntryType::XHeader, "PaxHeaders/big", 0o644), &pax(&sparse));
    let sparse_tar = tar.file("GNUSparseFile.0/big", b"1\n0\n5\nhello").finish();
    let dir = t.path().join("sparse");
    single_layer_layout(&dir, &sparse_tar, "t");
    match store.import(&oci_ref(&dir, None)) {
        Err(ImageError::Invalid { reason, .. }) => assert!(reason.contains("sparse"), "{reason}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_store_clean(&store);
}

#[test]
fn oci_archive_import() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("rootfs");
    fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
    fs::write(rootfs.join("usr/bin/app"), b"app").unwrap();
    let layout = t.path().join("layout");
    let digest = write_oci_layout(&layout, "latest", &rootfs, &ImageConfig::default()).unwrap();

    // Archive it the way `tar -C layout -cf img.tar .` would, plus the legacy
    // symlinks `docker save` adds (which must be skipped).
    let archive = t.path().join("img.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
        b.append_dir_all(".", &layout).unwrap();
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "legacy/layer.tar", "/etc/passwd").unwrap();
        b.finish().unwrap();
    }
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let r = parse(&format!("oci-archive:{}:latest", archive.display()));
    let image = store.import(&r).unwrap();
    assert_eq!(image.manifest_digest, digest);
    assert_eq!(image.reference, r.to_string());
    assert_eq!(
        fs::read(store.layer_dirs(&image)[0].join("usr/bin/app")).unwrap(),
        b"app"
    );
    assert_store_clean(&store);

    match store.import(&parse(&format!("oci-archive:{}:nope", archive.display()))) {
        Err(ImageError::NotFound { what, detail }) => {
            assert!(what.contains("\"nope\""), "{what}");
            assert!(detail.contains("latest"), "{detail}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_store_clean(&store);
    assert!(matches!(
        store.import(&parse("oci-archive:/nonexistent/x.tar")),
        Err(ImageError::NotFound { .. })
    ));
}

#[test]
fn tag_selection() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    let layout = t.path().join("layout");
    fs::write(rootfs.join("version"), b"1").unwrap();
    let d1 = write_oci_layout(&layout, "v1", &rootfs, &ImageConfig::default()).unwrap();
    fs::write(rootfs.join("version"), b"2").unwrap();
    let d2 = write_oci_layout(&layout, "v2", &rootfs, &ImageConfig::default()).unwrap();
    assert_ne!(d1, d2);
    // Re-tagging replaces the entry and keeps the other tag.
    fs::write(rootfs.join("version"), b"3").unwrap();
    let d3 = write_oci_layout(&layout, "v2", &rootfs, &ImageConfig::default()).unwrap();
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);

    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let v1 = store.import(&oci_ref(&layout, Some("v1"))).unwrap();
    assert_eq!(v1.manifest_digest, d1);
    assert_eq!(fs::read(store.layer_dirs(&v1)[0].join("version")).unwrap(), b"1");
    let v2 = store.import(&oci_ref(&layout, Some("v2"))).unwrap();
    assert_eq!(v2.manifest_digest, d3);
    assert_eq!(fs::read(store.layer_dirs(&v2)[0].join("version")).unwrap(), b"3");

    match store.import(&oci_ref(&layout, None)) {
        Err(e @ ImageError::BadReference { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("v1") && msg.contains("v2") && msg.contains(":TAG"),
                "{msg}"
            );
        }
        other => panic!("expected BadReference, got {other:?}"),
    }
    match store.import(&oci_ref(&layout, Some("v9"))) {
        Err(e @ ImageError::NotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("\"v9\"") && msg.contains("v1, v2"), "{msg}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    match store.import(&oci_ref(&t.path().join("missing"), None)) {
        Err(ImageError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    match store.import(&parse("docker.io/library/busybox:latest")) {
        Err(e @ ImageError::BadReference { .. }) => {
            assert!(e.to_string().contains("pulled"), "{e}");
        }
        other => panic!("expected BadReference, got {other:?}"),
    }
}

#[test]
fn image_index_picks_linux_amd64() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let l = Layout::new(&t.path().join("layout"));
    let arm = l.layer(&Tar::new().file("arch", b"arm64").finish(), Comp::Gzip, None);
    let amd = l.layer(&Tar::new().file("arch", b"amd64").finish(), Comp::Zstd, None);
    let arm_m = l.image(&[arm], "arm64", false);
    let amd_m = l.image(&[amd], "amd64", false);
    let with_platform = |mut d: Value, arch: &str| {
        d["platform"] = json!({"architecture": arch, "os": "linux"});
        d
    };
    let index = l.json(
        "application/vnd.oci.image.index.v1+json",
        &json!({"schemaVersion": 2, "manifests": [
            with_platform(arm_m.clone(), "arm64"),
            with_platform(amd_m.clone(), "amd64"),
        ]}),
    );
    let arm_only = l.json(
        "application/vnd.oci.image.index.v1+json",
        &json!({"schemaVersion": 2, "manifests": [
            with_platform(arm_m.clone(), "arm64"),
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_m["digest"], "size": arm_m["size"],
             "platform": {"architecture": "arm", "os": "linux", "variant": "v7"}},
        ]}),
    );
    // Docker's own flavour: manifest list, v2s2 manifest, docker layer type.
    let dlayer = l.layer(
        &Tar::new().file("arch", b"docker").finish(),
        Comp::Gzip,
        Some("application/vnd.docker.image.rootfs.diff.tar.gzip"),
    );
    let dm = l.image(&[dlayer], "amd64", true);
    let dlist = l.json(
        "application/vnd.docker.distribution.manifest.list.v2+json",
        &json!({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
                "manifests": [with_platform(dm.clone(), "amd64")]}),
    );
    l.index(&[
        (index, Some("multi")),
        (arm_only, Some("arm")),
        (dlist, Some("docker")),
        (arm_m, Some("arm-direct")),
    ]);

    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let image = store.import(&oci_ref(&l.dir, Some("multi"))).unwrap();
    assert_eq!(image.manifest_digest, amd_m["digest"].as_str().unwrap());
    assert_eq!(image.config.labels["arch"], "amd64");
    assert_eq!(image.config.cmd, ["/bin/sh"]);
    assert_eq!(fs::read(store.layer_dirs(&image)[0].join("arch")).unwrap(), b"amd64");

    match store.import(&oci_ref(&l.dir, Some("arm"))) {
        Err(e @ ImageError::UnsupportedPlatform { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("linux/arm64, linux/arm/v7"), "{msg}");
        }
        other => panic!("expected UnsupportedPlatform, got {other:?}"),
    }
    match store.import(&oci_ref(&l.dir, Some("arm-direct"))) {
        Err(e @ ImageError::UnsupportedPlatform { .. }) => {
            assert!(e.to_string().contains("linux/arm64"), "{e}");
        }
        other => panic!("expected UnsupportedPlatform, got {other:?}"),
    }

    let image = store.import(&oci_ref(&l.dir, Some("docker"))).unwrap();
    assert_eq!(image.manifest_digest, dm["digest"].as_str().unwrap());
    assert_eq!(fs::read(store.layer_dirs(&image)[0].join("arch")).unwrap(), b"docker");
    assert_store_clean(&store);
}

#[test]
fn unsupported_media_types_are_named() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let l = Layout::new(&t.path().join("layout"));
    let layer = l.layer(
        &Tar::new().file("f", b"f").finish(),
        Comp::Plain,
        Some("application/vnd.oci.image.layer.v1.tar+bzip2"),
    );
    let m = l.image(&[layer], "amd64", false);
    let artifact = l.json("application/vnd.cncf.helm.chart.content.v1.tar+gzip", &json!({}));
    l.index(&[(m, Some("bz")), (artifact, Some("helm"))]);
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    for (tag, mt) in [
        ("bz", "application/vnd.oci.image.layer.v1.tar+bzip2"),
        ("helm", "application/vnd.cncf.helm.chart.content.v1.tar+gzip"),
    ] {
        match store.import(&oci_ref(&l.dir, Some(tag))) {
            Err(ImageError::UnsupportedMediaType { media_type, .. }) => assert_eq!(media_type, mt),
            other => panic!("expected UnsupportedMediaType, got {other:?}"),
        }
    }
    assert!(list(&store.root().join("blobs/sha256")).is_empty());
}

#[test]
fn concurrent_imports_of_the_same_layers_both_succeed() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("rootfs");
    fs::create_dir_all(rootfs.join("data")).unwrap();
    for i in 0..200 {
        fs::write(rootfs.join(format!("data/{i}")), vec![i as u8; 4096]).unwrap();
    }
    let layout = t.path().join("layout");
    write_oci_layout(&layout, "t", &rootfs, &ImageConfig::default()).unwrap();
    let root = t.path().join("store");
    for round in 0..3 {
        let _ = fs::remove_dir_all(&root);
        let images: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    let (root, layout) = (&root, &layout);
                    // Separate stores on one root, as separate processes would be.
                    s.spawn(move || ImageStore::open(root).unwrap().import(&oci_ref(layout, None)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for image in &images {
            let image = image.as_ref().unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(image, images[0].as_ref().unwrap());
        }
        let store = ImageStore::open(&root).unwrap();
        assert_eq!(list(&store.root().join("layers")).len(), 1);
        assert_eq!(
            list(&store.layer_dirs(images[0].as_ref().unwrap())[0].join("data")).len(),
            200
        );
        assert_store_clean(&store);
    }
}

#[test]
fn open_clears_leftovers_in_tmp() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    drop(ImageStore::open(&root).unwrap());
    fs::create_dir_all(root.join("tmp/layer-1-1/deep")).unwrap();
    fs::write(root.join("tmp/blob-1-2"), b"partial").unwrap();
    let store = ImageStore::open(&root).unwrap();
    assert_store_clean(&store);
    // But not while another store on the same root is open.
    fs::write(root.join("tmp/blob-1-3"), b"in use").unwrap();
    let second = ImageStore::open(&root).unwrap();
    assert_eq!(list(&second.root().join("tmp")), ["blob-1-3"]);
}

#[test]
fn pax_metadata_from_hand_made_tars() {
    require_root!();
    let t = tempfile::tempdir().unwrap();
    let mut tar = Tar::new();
    tar.0
        .append_pax_extensions([
            (
                "SCHILY.xattr.security.capability",
                &b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"[..],
            ),
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/elsewhere"[..]),
            ("uid", &b"3000000"[..]),
            ("mtime", &b"1700000000.5"[..]),
        ])
        .unwrap();
    let mut h = Tar::header(EntryType::Regular, "ping", 0o4711);
    h.set_gid(42);
    tar.raw(h, b"elf");
    let mut h = Tar::header(EntryType::Block, "dev/sda", 0o660);
    h.set_device_major(8).unwrap();
    h.set_device_minor(0).unwrap();
    tar.raw(h, b"");
    let dir = t.path().join("layout");
    single_layer_layout(&dir, &tar.finish(), "t");
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let image = store.import(&oci_ref(&dir, None)).unwrap();
    let l = &store.layer_dirs(&image)[0];
    let ping = fs::symlink_metadata(l.join("ping")).unwrap();
    assert_eq!((ping.uid(), ping.gid()), (3_000_000, 42));
    assert_eq!(ping.mode() & 0o7777, 0o4711);
    assert_eq!((ping.mtime(), ping.mtime_nsec()), (1_700_000_000, 500_000_000));
    assert!(
        xattr(&l.join("ping"), "security.capability").is_some(),
        "file capability kept"
    );
    assert_eq!(
        xattr(&l.join("ping"), "trusted.overlay.redirect"),
        None,
        "overlay xattrs dropped"
    );
    let sda = fs::symlink_metadata(l.join("dev/sda")).unwrap();
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), rustix::fs::makedev(8, 0));
}
