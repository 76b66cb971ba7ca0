//! A node on one device: the real `weft run` scanning, watching and recording a folder.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use weft_node::store::{LocalEntry, Store};
use weft_protocol::chunk::build_manifest;
use weft_protocol::document::{self, EntryKind, FolderDocument};
use weft_protocol::{ChunkParams, FolderId, Manifest};
use weft_tests::{NodeConfig, TestNode, pseudo_random, wait_for, weft, write_tree};

fn manifest_of(path: &Path) -> Manifest {
    build_manifest(fs::File::open(path).unwrap(), &ChunkParams::DEFAULT, |_| {}).unwrap()
}

/// Every regular file under `root` with its expected manifest, by relative path.
fn expected_files(root: &Path) -> BTreeMap<String, Manifest> {
    let mut expected = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let relative = entry
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                expected.insert(relative, manifest_of(&entry.path()));
            }
        }
    }
    expected
}

fn recorded(node: &TestNode, folder: &str) -> BTreeMap<String, LocalEntry> {
    node.files(folder)
        .into_iter()
        .map(|info| (info.path, info.entry))
        .collect()
}

fn assert_files_match(
    recorded: &BTreeMap<String, LocalEntry>,
    expected: &BTreeMap<String, Manifest>,
) {
    for (path, manifest) in expected {
        let entry = recorded
            .get(path)
            .unwrap_or_else(|| panic!("{path} not recorded"));
        assert_eq!(entry.kind, EntryKind::File, "{path}");
        assert_eq!(entry.size, manifest.size(), "{path}");
        assert_eq!(
            entry.manifest,
            Some(manifest.hash()),
            "{path}: wrong manifest"
        );
    }
    let recorded_files = recorded
        .values()
        .filter(|e| e.kind == EntryKind::File)
        .count();
    assert_eq!(recorded_files, expected.len(), "extra files recorded");
}

/// Opens a stopped node's store and folder document.
fn open_document(home: &Path, folder: &str) -> (Store, FolderDocument) {
    let store = Store::open(&home.join("weft.redb"), [0; 8]).unwrap();
    let id = FolderId::new(folder).unwrap();
    let (snapshot, increments) = store.document(&id).unwrap();
    let key = weft_protocol::DeviceKey::from_key_file(
        &fs::read_to_string(home.join("device.key")).unwrap(),
    )
    .unwrap();
    let actor = document::actor_id(&key.device_id(), store.actor_suffix());
    let document =
        FolderDocument::load(&snapshot, increments.iter().map(Vec::as_slice), actor).unwrap();
    (store, document)
}

fn wait_idle(node: &TestNode, folder: &str, min_scans: u64) {
    let idle = wait_for(Duration::from_secs(120), || {
        node.status().folders.iter().any(|f| {
            f.id == folder
                && f.scans >= min_scans
                && f.progress.is_none()
                && f.state == weft_node::folder::FolderState::Idle
        })
    });
    assert!(idle.is_some(), "folder never became idle:\n{}", node.log());
}

#[test]
fn scan_records_every_file_with_the_right_manifest_and_one_document_version() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    write_tree(&root, 40, 10_000, 1);
    fs::create_dir_all(root.join("empty/dir")).unwrap();
    fs::write(root.join("zero"), b"").unwrap();
    // One file large enough for the multi-segment chunk pipeline.
    fs::write(root.join("big.bin"), pseudo_random(9 * 1024 * 1024 + 17, 2)).unwrap();
    fs::write(root.join("mid.bin"), pseudo_random(3 * 1024 * 1024, 3)).unwrap();
    std::os::unix::fs::symlink("big.bin", root.join("link")).unwrap();
    let node = TestNode::start(&dir.path().join("home"), &NodeConfig::default());
    let folder = node.add_folder(&root, "docs");
    node.scan(&folder);
    let expected = expected_files(&root);
    let recorded = recorded(&node, &folder);
    assert_files_match(&recorded, &expected);
    assert_eq!(recorded["empty/dir"].kind, EntryKind::Directory);
    assert_eq!(recorded["link"].kind, EntryKind::Symlink);
    assert_eq!(recorded["link"].symlink_target.as_deref(), Some("big.bin"));
    let status = node.status();
    assert_eq!(status.folders[0].files, expected.len() as u64);
    assert!(node.stop(), "node did not exit cleanly");

    let (_store, mut document) = open_document(&dir.path().join("home"), &folder);
    let history = document.history();
    for (path, manifest) in &expected {
        let versions = &history[path];
        assert_eq!(versions.len(), 1, "{path} has {} versions", versions.len());
        assert_eq!(versions[0].content.manifest_hash(), Some(manifest.hash()));
        assert!(!versions[0].deleted);
    }
    assert_eq!(history.len(), recorded.len());
}

#[test]
fn the_watcher_sees_each_kind_of_change_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    fs::create_dir_all(root.join("dir")).unwrap();
    fs::write(root.join("a.txt"), b"first").unwrap();
    let node = TestNode::start(&dir.path().join("home"), &NodeConfig::default());
    let folder = node.add_folder(&root, "w");
    wait_idle(&node, &folder, 1);

    let within_a_second =
        |what: &str, condition: &dyn Fn(&BTreeMap<String, LocalEntry>) -> bool| {
            let took = wait_for(Duration::from_secs(1), || {
                condition(&recorded(&node, &folder))
            });
            assert!(
                took.is_some(),
                "{what} not seen within 1 s:\n{}",
                node.log()
            );
        };
    fs::write(root.join("new.txt"), b"hello").unwrap();
    within_a_second("create", &|t| t.get("new.txt").is_some_and(|e| e.size == 5));
    fs::write(root.join("new.txt"), b"hello, world").unwrap();
    within_a_second("modify", &|t| {
        t.get("new.txt").is_some_and(|e| e.size == 12)
    });
    fs::rename(root.join("new.txt"), root.join("renamed.txt")).unwrap();
    within_a_second("rename", &|t| {
        !t.contains_key("new.txt") && t.contains_key("renamed.txt")
    });
    fs::create_dir_all(root.join("d2/sub")).unwrap();
    within_a_second("mkdir", &|t| {
        t.get("d2/sub")
            .is_some_and(|e| e.kind == EntryKind::Directory)
    });
    fs::rename(root.join("renamed.txt"), root.join("d2/sub/moved.txt")).unwrap();
    within_a_second("move", &|t| {
        !t.contains_key("renamed.txt") && t.contains_key("d2/sub/moved.txt")
    });
    fs::remove_dir_all(root.join("d2")).unwrap();
    within_a_second("rmdir", &|t| !t.keys().any(|p| p.starts_with("d2")));
    fs::remove_file(root.join("a.txt")).unwrap();
    within_a_second("delete", &|t| !t.contains_key("a.txt"));
    let tree = recorded(&node, &folder);
    assert_eq!(tree.keys().collect::<Vec<_>>(), vec!["dir"]);
}

#[test]
fn a_rescan_alone_finds_every_change_with_the_watcher_off() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    write_tree(&root, 20, 5_000, 10);
    fs::write(root.join("keep.txt"), b"keep").unwrap();
    let large = pseudo_random(5 * 1024 * 1024, 11);
    fs::write(root.join("large.bin"), &large).unwrap();
    let config = NodeConfig {
        watch: false,
        ..NodeConfig::default()
    };
    let node = TestNode::start(&dir.path().join("home"), &config);
    let folder = node.add_folder(&root, "nowatch");
    node.scan(&folder);
    assert_files_match(&recorded(&node, &folder), &expected_files(&root));

    fs::write(root.join("d000/f3.bin"), pseudo_random(7_000, 99)).unwrap();
    fs::remove_file(root.join("d000/f4.bin")).unwrap();
    fs::rename(root.join("d000/f5.bin"), root.join("moved.bin")).unwrap();
    fs::create_dir_all(root.join("newdir/inner")).unwrap();
    fs::write(root.join("newdir/inner/n.txt"), b"new").unwrap();
    // A large file after a small edit is re-hashed like its previous version: the
    // manifest must be the one a fresh chunking gives (checked below).
    let mut edited = b"ten bytes!".to_vec();
    edited.extend_from_slice(&large[..3 * 1024 * 1024]);
    edited.extend_from_slice(&pseudo_random(4096, 12));
    edited.extend_from_slice(&large[3 * 1024 * 1024 + 4096..]);
    edited.extend_from_slice(&pseudo_random(100_000, 13));
    fs::write(root.join("large.bin"), &edited).unwrap();
    // With the watcher off nothing notices until a scan.
    std::thread::sleep(Duration::from_millis(400));
    assert!(recorded(&node, &folder).contains_key("d000/f4.bin"));
    let result = node.scan(&folder);
    // Modify (two), delete, rename (a removal and an addition), and a new dir, dir and
    // file.
    assert_eq!(result[&folder]["changes"], 8, "{result}");
    let tree = recorded(&node, &folder);
    assert_files_match(&tree, &expected_files(&root));
    assert_eq!(tree["newdir/inner"].kind, EntryKind::Directory);
    // A second scan finds nothing new.
    assert_eq!(node.scan(&folder)[&folder]["changes"], 0);

    // Ignore rules from .weftignore apply from the next scan on; newly ignored paths
    // leave the local tree.
    fs::write(root.join(".weftignore"), "*.tmp\nbuild/\n/newdir\n").unwrap();
    fs::create_dir_all(root.join("build/out")).unwrap();
    fs::write(root.join("build/out/a.o"), b"obj").unwrap();
    fs::write(root.join("d000/scratch.tmp"), b"tmp").unwrap();
    node.scan(&folder);
    let tree = recorded(&node, &folder);
    assert!(tree.contains_key(".weftignore"));
    assert!(
        !tree
            .keys()
            .any(|p| p.starts_with("build") || p.ends_with(".tmp")),
        "{tree:?}"
    );
    assert!(!tree.keys().any(|p| p.starts_with("newdir")), "{tree:?}");
    assert!(tree.contains_key("d000/f10.bin"));
}

#[test]
fn kill_9_during_a_scan_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    write_tree(&root, 12_000, 3_000, 20);
    for index in 0..3 {
        fs::write(
            root.join(format!("large{index}.bin")),
            pseudo_random(24 * 1024 * 1024, 30 + index),
        )
        .unwrap();
    }
    let home = dir.path().join("home");
    let config = NodeConfig {
        watch: false,
        ..NodeConfig::default()
    };
    let node = TestNode::start(&home, &config);
    // Kill the node the moment its first scan batch is committed (its first
    // local_change event), long before the scan of 12,000 files ends.
    let killer = {
        let pid = node.pid().to_string();
        let home = home.clone();
        std::thread::spawn(move || {
            let client = weft_node::client::Client::connect(&home).unwrap();
            client
                .follow_events(|event| {
                    if event["type"] == "local_change" {
                        std::process::Command::new("kill")
                            .args(["-9", &pid])
                            .status()
                            .unwrap();
                        return false;
                    }
                    true
                })
                .unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let folder = "big".to_owned();
    let _ = weft(
        &home,
        &["folder", "add", root.to_str().unwrap(), "--id", &folder],
    );
    killer.join().unwrap();
    node.kill9();
    // The kill really was mid-scan: part of the tree, not all of it, was committed.
    let committed = {
        let store = Store::open(&home.join("weft.redb"), [0; 8]).unwrap();
        store
            .local_tree(&FolderId::new(&folder).unwrap())
            .unwrap()
            .len()
    };
    assert!(
        committed > 0 && committed < 12_000,
        "{committed} rows committed at the kill"
    );

    let node = TestNode::start(&home, &config);
    wait_idle(&node, &folder, 1);
    let expected = expected_files(&root);
    assert_files_match(&recorded(&node, &folder), &expected);
    assert!(node.stop());
    let (store, mut document) = open_document(&home, &folder);
    let history = document.history();
    for (path, manifest) in &expected {
        let versions = history
            .get(path)
            .unwrap_or_else(|| panic!("{path} lost from the document"));
        assert_eq!(
            versions.len(),
            1,
            "{path} recorded {} times",
            versions.len()
        );
        assert_eq!(versions[0].content.manifest_hash(), Some(manifest.hash()));
    }
    // The block index covers exactly the recorded files.
    let blocks: usize = expected.values().map(|m| m.blocks().len()).sum();
    assert_eq!(store.block_index_len().unwrap(), blocks as u64);
}

#[test]
fn awkward_files_are_handled_as_documented() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("zero"), b"").unwrap();
    fs::write(root.join("line\nbreak.txt"), b"newline in name").unwrap();
    std::os::unix::fs::symlink("loop_b", root.join("loop_a")).unwrap();
    std::os::unix::fs::symlink("loop_a", root.join("loop_b")).unwrap();
    fs::write(root.join(std::ffi::OsStr::from_bytes(b"bad\xff.txt")), b"x").unwrap();
    fs::write(root.join("growing.log"), pseudo_random(8 * 1024 * 1024, 5)).unwrap();
    let config = NodeConfig {
        watch: false,
        ..NodeConfig::default()
    };
    let node = TestNode::start(&dir.path().join("home"), &config);
    // The file keeps growing while the first scans run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let path = root.join("growing.log");
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = fs::OpenOptions::new().append(true).open(path).unwrap();
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                file.write_all(&pseudo_random(64 * 1024, round)).unwrap();
                round += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let folder = node.add_folder(&root, "odd");
    let during = node.scan(&folder);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // The scan completed and reported the non-UTF-8 name.
    let problems = during[&folder]["problems"].as_array().unwrap().clone();
    assert!(
        problems
            .iter()
            .any(|p| p["error"].as_str().unwrap().contains("UTF-8")),
        "{problems:?}"
    );
    // Once the file stops growing, a scan records its final content exactly.
    node.scan(&folder);
    let tree = recorded(&node, &folder);
    let growing = &tree["growing.log"];
    assert_eq!(
        growing.manifest,
        Some(manifest_of(&root.join("growing.log")).hash())
    );
    assert_eq!(tree["zero"].size, 0);
    assert_eq!(tree["zero"].manifest, Some(Manifest::empty().hash()));
    assert_eq!(tree["line\nbreak.txt"].size, 15);
    assert_eq!(tree["loop_a"].kind, EntryKind::Symlink);
    assert_eq!(tree["loop_a"].symlink_target.as_deref(), Some("loop_b"));
    assert_eq!(tree["loop_b"].symlink_target.as_deref(), Some("loop_a"));
    assert!(!tree.keys().any(|p| p.starts_with("bad")));
    assert_eq!(tree.len(), 5);
}

/// Root reads every file whatever its mode, so as root the node runs as `nobody`.
fn unprivileged_wrapper() -> Result<Vec<&'static str>, String> {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Ok(Vec::new());
    }
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output();
    if setpriv.is_err() {
        return Err("running as root and setpriv (util-linux) is missing".into());
    }
    Ok(vec![
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ])
}

#[test]
fn an_unreadable_file_is_reported_and_skipped() {
    let wrapper = match unprivileged_wrapper() {
        Ok(wrapper) => wrapper,
        Err(reason) => {
            println!("SKIPPED an_unreadable_file_is_reported_and_skipped: {reason}");
            return;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let root = dir.path().join("folder");
    let home = dir.path().join("home");
    for path in [&root, &home] {
        fs::create_dir_all(path).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::write(root.join("readable.txt"), b"fine").unwrap();
    fs::write(root.join("secret.txt"), b"no").unwrap();
    fs::set_permissions(root.join("readable.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(root.join("secret.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    let config = NodeConfig {
        watch: false,
        ..NodeConfig::default()
    };
    let node = TestNode::start_with(&home, &config, &wrapper);
    let folder = node.add_folder(&root, "perm");
    let result = node.scan(&folder);
    let problems = result[&folder]["problems"].as_array().unwrap().clone();
    assert!(
        problems.iter().any(
            |p| p["path"] == "secret.txt" && p["error"].as_str().unwrap().contains("ermission")
        ),
        "{problems:?}"
    );
    let tree = recorded(&node, &folder);
    assert!(tree.contains_key("readable.txt"));
    assert!(!tree.contains_key("secret.txt"));
    // The status shows it too.
    assert!(
        node.status().folders[0]
            .problems
            .iter()
            .any(|p| p.path == "secret.txt")
    );
}

#[test]
fn status_without_a_node_says_how_to_start_one() {
    let home = tempfile::tempdir().unwrap();
    let output = weft(home.path(), &["status"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("no weft node is running"), "{stderr}");
    assert!(stderr.contains("weft run"), "{stderr}");
    // A stale api.json from a killed node gives the same answer.
    fs::write(
        home.path().join("api.json"),
        r#"{"address":"127.0.0.1:1","pid":1}"#,
    )
    .unwrap();
    fs::write(
        home.path().join("config.toml"),
        "api_key = \"0123456789abcdef0123\"\n",
    )
    .unwrap();
    let output = weft(home.path(), &["status", "--json"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("weft run")
    );
}

#[test]
fn a_scan_removes_temp_files_unchanged_past_their_expiry_and_keeps_recent_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("sub/real.txt"), b"real").unwrap();
    let old = root.join("sub/.weft.tmp.0123456789abcdef01234567");
    let fresh = root.join(".weft.tmp.fedcba9876543210fedcba98");
    fs::write(&old, b"abandoned download").unwrap();
    // The age that counts is since the last change (ctime), which no one can set back,
    // so the test waits past a short expiry instead of faking an old mtime.
    let expiry = Duration::from_secs(4);
    std::thread::sleep(expiry + Duration::from_millis(500));
    let config = NodeConfig {
        watch: false,
        temp_file_expiry_s: expiry.as_secs(),
        ..NodeConfig::default()
    };
    let node = TestNode::start(&dir.path().join("home"), &config);
    fs::write(&fresh, b"download in progress").unwrap();
    // A finished download carries its version's old mtime: not abandoned for that.
    fs::File::options()
        .write(true)
        .open(&fresh)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600))
        .unwrap();
    let folder = node.add_folder(&root, "temps");
    node.scan(&folder);
    assert!(!old.exists(), "the abandoned temp file is still there");
    assert!(fresh.exists(), "a recent temp file was removed");
    assert_eq!(fs::read(root.join("sub/real.txt")).unwrap(), b"real");
    // Temp files are never recorded as the folder's files.
    let tree = recorded(&node, &folder);
    assert!(
        tree.keys().all(|path| !path.contains(".weft.tmp.")),
        "{tree:?}"
    );
    assert!(tree.contains_key("sub/real.txt"));
}
