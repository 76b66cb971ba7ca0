//! Devices syncing folders: real `weft` processes on 127.0.0.1.

use std::fs;
use std::time::Duration;

use weft_tests::{
    NodeConfig, TestNode, connect, pseudo_random, share_along, tree_digest, wait_converged,
    wait_for, write_tree,
};

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn three_devices_in_a_chain_converge_after_every_kind_of_change() {
    let dir = tempfile::tempdir().unwrap();
    let roots: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(format!("folder_{n}")))
        .collect();
    write_tree(&roots[0], 30, 20_000, 1);
    fs::write(roots[0].join("big.bin"), pseudo_random(3 * 1024 * 1024, 9)).unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.path().join("home_a"), &config);
    let b = TestNode::start(&dir.path().join("home_b"), &config);
    let c = TestNode::start(&dir.path().join("home_c"), &config);
    // Only A-B and B-C know each other.
    let nodes = [&a, &b, &c];
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    share_along(&nodes, &paths, "chain");
    let first = wait_converged(&paths, &nodes, CONVERGE);
    assert!(first.contains_key("d000/f5.bin") && first.contains_key("big.bin"));

    // Changes on every device: create, modify, delete, rename, move, mkdir, rmdir.
    fs::write(roots[0].join("from_a.txt"), b"made on A").unwrap();
    fs::write(roots[0].join("d000/f1.bin"), pseudo_random(30_000, 77)).unwrap();
    fs::create_dir_all(roots[1].join("new/deep/dir")).unwrap();
    fs::write(roots[1].join("new/deep/dir/from_b.txt"), b"made on B").unwrap();
    fs::remove_file(roots[1].join("d000/f2.bin")).unwrap();
    fs::rename(roots[2].join("d000/f3.bin"), roots[2].join("renamed.bin")).unwrap();
    fs::rename(roots[2].join("big.bin"), roots[2].join("new_big.bin")).unwrap();
    let tree = wait_converged(&paths, &nodes, CONVERGE);
    assert_eq!(
        tree["from_a.txt"],
        blake3::hash(b"made on A").to_hex().to_string()
    );
    assert!(tree.contains_key("new/deep/dir/from_b.txt"));
    assert!(!tree.contains_key("d000/f2.bin"));
    assert!(tree.contains_key("renamed.bin") && !tree.contains_key("d000/f3.bin"));
    assert!(tree.contains_key("new_big.bin") && !tree.contains_key("big.bin"));

    // A folder moved and another removed on C reach A through B.
    fs::rename(roots[2].join("new"), roots[2].join("moved_new")).unwrap();
    fs::remove_dir_all(roots[2].join("d000")).unwrap();
    let tree = wait_converged(&paths, &nodes, CONVERGE);
    assert!(tree.contains_key("moved_new/deep/dir/from_b.txt"));
    let stale: Vec<&String> = tree
        .keys()
        .filter(|p| p.starts_with("new/") || p.starts_with("d000"))
        .collect();
    assert!(
        stale.is_empty(),
        "moved or removed paths came back: {stale:?}\n{}",
        [&a, &b, &c]
            .iter()
            .map(|n| n.log())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    );
}

#[test]
fn concurrent_offline_edits_keep_every_version_as_a_conflict_copy() {
    let dir = tempfile::tempdir().unwrap();
    let roots: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(format!("folder_{n}")))
        .collect();
    fs::create_dir_all(&roots[0]).unwrap();
    fs::write(roots[0].join("shared.txt"), b"original").unwrap();
    fs::write(roots[0].join("other.txt"), b"other").unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.path().join("home_a"), &config);
    let b = TestNode::start(&dir.path().join("home_b"), &config);
    let c = TestNode::start(&dir.path().join("home_c"), &config);
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    share_along(&[&a, &b, &c], &paths, "conf");
    wait_converged(&paths, &[&a, &b, &c], CONVERGE);

    // B, the only link between A and C, goes offline; A and C edit the same file.
    let b_home = b.home.clone();
    b.kill9();
    fs::write(roots[0].join("shared.txt"), b"edited on A").unwrap();
    fs::write(roots[0].join("only_a.txt"), b"A's own file").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(roots[2].join("shared.txt"), b"edited on C, later").unwrap();
    fs::write(roots[2].join("only_c.txt"), b"C's own file").unwrap();
    let scanned = wait_for(Duration::from_secs(10), || {
        let files = |node: &TestNode| node.files("conf");
        files(&a).iter().any(|f| f.path == "only_a.txt")
            && files(&c).iter().any(|f| f.path == "only_c.txt")
    });
    assert!(scanned.is_some());
    let b = TestNode::start(&b_home, &config);
    let tree = wait_converged(&paths, &[&a, &b, &c], CONVERGE);
    let copies: Vec<&String> = tree
        .keys()
        .filter(|p| p.contains(".sync-conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "{tree:#?}");
    let versions: Vec<&String> = [
        tree.get("shared.txt").unwrap(),
        tree.get(copies[0]).unwrap(),
    ]
    .into_iter()
    .collect();
    let hash = |bytes: &[u8]| blake3::hash(bytes).to_hex().to_string();
    // The newer edit (C's) wins; A's is kept as the copy. Nothing is lost.
    assert_eq!(versions[0], &hash(b"edited on C, later"));
    assert_eq!(versions[1], &hash(b"edited on A"));
    assert!(
        tree.contains_key("only_a.txt")
            && tree.contains_key("only_c.txt")
            && tree.contains_key("other.txt")
    );
}

/// A replaces the file `x` of its folder with a directory of two files.
fn replace_x_with_a_directory(root: &std::path::Path) {
    fs::remove_file(root.join("x")).unwrap();
    fs::create_dir_all(root.join("x/inner")).unwrap();
    fs::write(root.join("x/a.txt"), b"A's file in the directory x").unwrap();
    fs::write(root.join("x/inner/b.txt"), b"deeper").unwrap();
}

/// Waits until both folders hold A's directory `x` with its files and B's edit of the
/// file `x` as the one conflict copy beside it; returns the copy's path.
fn wait_directory_kept_and_edit_copied(
    paths: &[&std::path::Path],
    a: &TestNode,
    b: &TestNode,
) -> String {
    let tree = wait_for_copy_beside(paths, a, b, "x/inner/b.txt", "x.sync-conflict-");
    let hash = |bytes: &[u8]| blake3::hash(bytes).to_hex().to_string();
    assert_eq!(tree.get("x"), Some(&"dir".to_string()), "{tree:#?}");
    assert_eq!(
        tree.get("x/a.txt"),
        Some(&hash(b"A's file in the directory x")),
        "{tree:#?}"
    );
    assert_eq!(tree.get("x/inner/b.txt"), Some(&hash(b"deeper")));
    let copies: Vec<(&String, &String)> = tree
        .iter()
        .filter(|(p, _)| p.starts_with("x.sync-conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "{tree:#?}");
    assert_eq!(copies[0].1, &hash(b"B's edit of the file x"), "{tree:#?}");
    assert_eq!(
        tree.len(),
        5,
        "x, x/a.txt, x/inner/, x/inner/b.txt, the copy: {tree:#?}"
    );
    copies[0].0.clone()
}

/// Waits until both folders hold the same tree, with `path` and a name starting with
/// `copy_prefix` in it; returns that tree.
fn wait_for_copy_beside(
    paths: &[&std::path::Path],
    a: &TestNode,
    b: &TestNode,
    path: &str,
    copy_prefix: &str,
) -> std::collections::BTreeMap<String, String> {
    let settled = wait_for(CONVERGE, || {
        let trees: Vec<_> = paths.iter().map(|root| tree_digest(root)).collect();
        trees[0] == trees[1]
            && trees[0].contains_key(path)
            && trees[0].keys().any(|p| p.starts_with(copy_prefix))
    });
    let tree = tree_digest(paths[1]);
    assert!(
        settled.is_some(),
        "{:#?}\n{tree:#?}\n{}\n-----\n{}",
        tree_digest(paths[0]),
        a.log(),
        b.log()
    );
    tree
}

/// Nodes A and B (with their configs) sharing folder `label`, whose root on A holds
/// what `fill` wrote before A started: the two roots, A and B.
fn pair(
    dir: &std::path::Path,
    label: &str,
    (a_config, b_config): (&NodeConfig, &NodeConfig),
    fill: impl FnOnce(&std::path::Path),
) -> (Vec<std::path::PathBuf>, TestNode, TestNode) {
    let roots: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| dir.join(format!("folder_{n}")))
        .collect();
    fs::create_dir_all(&roots[0]).unwrap();
    fill(&roots[0]);
    let a = TestNode::start(&dir.join("home_a"), a_config);
    let b = TestNode::start(&dir.join("home_b"), b_config);
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    share_along(&[&a, &b], &paths, label);
    (roots, a, b)
}

/// Two nodes sharing folder "shape", which holds the file `x`; B with `b_config`.
fn pair_sharing_x(
    dir: &std::path::Path,
    b_config: &NodeConfig,
) -> (Vec<std::path::PathBuf>, TestNode, TestNode) {
    let (roots, a, b) = pair(dir, "shape", (&NodeConfig::default(), b_config), |root| {
        fs::write(root.join("x"), b"a file named x").unwrap();
    });
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    wait_converged(&paths, &[&a, &b], CONVERGE);
    (roots, a, b)
}

#[test]
fn a_file_edited_while_it_became_a_directory_elsewhere_is_kept_and_the_directory_filled() {
    let dir = tempfile::tempdir().unwrap();
    // B does not watch: its edit below is found only when B looks at x again.
    let unwatched = NodeConfig {
        watch: false,
        ..NodeConfig::default()
    };
    let (roots, a, b) = pair_sharing_x(dir.path(), &unwatched);
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    // B edits x; before B has published it, A replaces x with a directory of files.
    fs::write(roots[1].join("x"), b"B's edit of the file x").unwrap();
    replace_x_with_a_directory(&roots[0]);
    // B finds its edit when it goes to replace x (the pre-replace check), keeps it as
    // a conflict copy, and then gets the files under x, which it refused while its
    // file stood there.
    let copy = wait_directory_kept_and_edit_copied(&paths, &a, &b);
    // `weft conflicts` names the copy and what it conflicts with.
    let listed = weft_tests::weft(&b.home, &["conflicts", "shape", "--json"]);
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed,
        serde_json::json!([{ "folder": "shape", "copy": copy, "original": "x" }])
    );
}

#[test]
fn a_file_edited_offline_against_a_directory_made_elsewhere_keeps_both() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::default();
    let (roots, a, b) = pair_sharing_x(dir.path(), &config);
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    // B is offline while it edits x and A replaces x with a directory of files: two
    // concurrent versions of x.
    let b_home = b.home.clone();
    b.kill9();
    fs::write(roots[1].join("x"), b"B's edit of the file x").unwrap();
    replace_x_with_a_directory(&roots[0]);
    let scanned = wait_for(Duration::from_secs(10), || {
        a.files("shape").iter().any(|f| f.path == "x/inner/b.txt")
    });
    assert!(scanned.is_some());
    let b = TestNode::start(&b_home, &config);
    // The directory wins (its contents stay where they are) and B's edit is kept as a
    // conflict copy beside it, on both devices.
    wait_directory_kept_and_edit_copied(&paths, &a, &b);
}

#[test]
fn a_directory_replaced_by_a_file_while_a_file_was_added_to_it_offline_keeps_both() {
    let dir = tempfile::tempdir().unwrap();
    let roots: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| dir.path().join(format!("folder_{n}")))
        .collect();
    fs::create_dir_all(roots[0].join("d")).unwrap();
    fs::write(
        roots[0].join("d/old.txt"),
        b"in the directory from the start",
    )
    .unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.path().join("home_a"), &config);
    let b = TestNode::start(&dir.path().join("home_b"), &config);
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    share_along(&[&a, &b], &paths, "shape");
    wait_converged(&paths, &[&a, &b], CONVERGE);
    // B is offline while it adds a file to d and A replaces d (and what it knew in it)
    // with a file of the same name.
    let b_home = b.home.clone();
    b.kill9();
    fs::write(roots[1].join("d/new.txt"), b"B's new file in d").unwrap();
    fs::remove_dir_all(roots[0].join("d")).unwrap();
    fs::write(roots[0].join("d"), b"A's file d").unwrap();
    let scanned = wait_for(Duration::from_secs(10), || {
        a.files("shape")
            .iter()
            .any(|f| f.path == "d" && f.entry.kind == weft_protocol::document::EntryKind::File)
    });
    assert!(scanned.is_some(), "{}", a.log());
    let b = TestNode::start(&b_home, &config);
    // B cannot remove its d, which holds a file A never saw: the directory stays, with
    // B's new file, and A's file d is kept beside it as a conflict copy (it was lost
    // from the folder before: the directory published again superseded it).
    let tree = wait_for_copy_beside(&paths, &a, &b, "d/new.txt", "d.sync-conflict-");
    let copy = tree
        .keys()
        .find(|p| p.starts_with("d.sync-conflict-"))
        .unwrap();
    assert_eq!(fs::read(roots[1].join(copy)).unwrap(), b"A's file d");
    assert_eq!(
        fs::read(roots[0].join("d/new.txt")).unwrap(),
        b"B's new file in d"
    );
    assert!(!tree.contains_key("d/old.txt"), "{tree:#?}");
    assert_eq!(
        tree.keys().filter(|p| p.contains("sync-conflict")).count(),
        1,
        "{tree:#?}"
    );
}

#[test]
fn a_download_interrupted_by_kill_9_resumes_without_refetching_verified_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = dir.path().join("folder_a");
    let root_b = dir.path().join("folder_b");
    fs::create_dir_all(&root_a).unwrap();
    let content = pseudo_random(200 * 1024 * 1024, 1234);
    fs::write(root_a.join("huge.bin"), &content).unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.path().join("home_a"), &config);
    let b = TestNode::start(&dir.path().join("home_b"), &config);
    connect(&a, &b);
    a.add_folder(&root_a, "big");
    wait_for(Duration::from_secs(60), || {
        a.files("big").iter().any(|f| f.path == "huge.bin")
    });
    a.share_with("big", &b, &root_b);
    // Kill B once part of the file has arrived.
    let started = wait_for(Duration::from_secs(60), || b.bytes_in() > 40 * 1024 * 1024);
    assert!(started.is_some(), "transfer did not start:\n{}", b.log());
    let b_home = b.home.clone();
    b.kill9();
    // What B already holds: the verified blocks of its temp file.
    let manifest = weft_protocol::chunk::build_manifest(
        &content[..],
        &weft_protocol::ChunkParams::DEFAULT,
        |_| {},
    )
    .unwrap();
    let temp = fs::read_dir(&root_b)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(".weft.tmp."))
        .expect("a temp file is left behind")
        .path();
    let partial = fs::read(&temp).unwrap();
    let verified: u64 = manifest
        .blocks_with_offsets()
        .filter(|(offset, block)| {
            let range = *offset as usize..*offset as usize + block.len as usize;
            partial
                .get(range)
                .is_some_and(|data| weft_protocol::BlockHash::of(data) == block.hash)
        })
        .map(|(_, block)| u64::from(block.len))
        .sum();
    assert!(
        verified > 0 && verified < manifest.size(),
        "{verified} bytes verified at the kill"
    );
    let remaining = manifest.size() - verified;

    let b = TestNode::start(&b_home, &config);
    let done = wait_for(Duration::from_secs(120), || {
        fs::metadata(root_b.join("huge.bin")).is_ok_and(|m| m.len() == content.len() as u64)
    });
    assert!(done.is_some(), "transfer did not finish:\n{}", b.log());
    assert!(
        fs::read(root_b.join("huge.bin")).unwrap() == content,
        "content differs"
    );
    let received = b.bytes_in();
    let one_batch = (weft_node::fetch::BATCH_BLOCKS as u64)
        * u64::from(weft_protocol::ChunkParams::DEFAULT.max());
    assert!(
        received <= remaining + one_batch,
        "received {received} bytes after restart; {remaining} were missing"
    );
}

#[test]
fn old_versions_are_listed_and_restored_and_the_restore_syncs_back() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = dir.path().join("folder_a");
    let root_b = dir.path().join("folder_b");
    fs::create_dir_all(&root_a).unwrap();
    let first = pseudo_random(300_000, 1);
    fs::write(root_a.join("notes.bin"), &first).unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.path().join("home_a"), &config);
    let b = TestNode::start(&dir.path().join("home_b"), &config);
    share_along(&[&a, &b], &[&root_a, &root_b], "v");
    wait_converged(&[&root_a, &root_b], &[&a, &b], CONVERGE);
    let second = pseudo_random(200_000, 2);
    fs::write(root_a.join("notes.bin"), &second).unwrap();
    let arrived = wait_for(CONVERGE, || {
        fs::read(root_b.join("notes.bin")).is_ok_and(|d| d == second)
    });
    assert!(arrived.is_some(), "edit never reached B:\n{}", b.log());

    let path = root_b.join("notes.bin");
    let output = weft_tests::weft(&b.home, &["versions", path.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{output:?}");
    let versions: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let sizes: Vec<u64> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![300_000, 200_000]);

    let output = weft_tests::weft(&b.home, &["restore", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}\n{}", b.log());
    assert_eq!(
        fs::read(root_b.join("notes.bin")).unwrap(),
        first,
        "restore did not bring back the old bytes"
    );
    let synced_back = wait_for(CONVERGE, || {
        fs::read(root_a.join("notes.bin")).is_ok_and(|d| d == first)
    });
    assert!(
        synced_back.is_some(),
        "the restore did not reach A:\n{}",
        a.log()
    );
    // The restore is a new version, not a rewrite of history.
    let output = weft_tests::weft(
        &a.home,
        &[
            "versions",
            root_a.join("notes.bin").to_str().unwrap(),
            "--json",
        ],
    );
    let versions: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 3);
}

/// A shares `root_a` (holding `shared.txt`) with B as view-only; B accepts into
/// `root_b`. Returns once both hold the same tree.
fn share_view_only(
    dir: &std::path::Path,
    root_a: &std::path::Path,
    root_b: &std::path::Path,
) -> (TestNode, TestNode) {
    fs::create_dir_all(root_a).unwrap();
    fs::write(root_a.join("shared.txt"), b"from A").unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.join("home_a"), &config);
    let b = TestNode::start(&dir.join("home_b"), &config);
    connect(&a, &b);
    a.add_folder(root_a, "view");
    let output = weft_tests::weft(
        &a.home,
        &["folder", "share", "view", &b.id(), "--perm", "view"],
    );
    assert!(output.status.success());
    let invited = wait_for(CONVERGE, || {
        let invites: serde_json::Value = b.client().get("/v1/invites").unwrap();
        invites
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["invite"]["role"] == "View"))
    });
    assert!(invited.is_some());
    let output = weft_tests::weft(
        &b.home,
        &[
            "invites",
            "accept",
            "view",
            "--path",
            root_b.to_str().unwrap(),
        ],
    );
    assert!(output.status.success());
    wait_converged(&[root_a, root_b], &[&a, &b], CONVERGE);
    (a, b)
}

#[test]
fn a_view_only_device_receives_but_keeps_its_edits_local() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = dir.path().join("folder_a");
    let root_b = dir.path().join("folder_b");
    let (a, b) = share_view_only(dir.path(), &root_a, &root_b);
    // B edits and adds: nothing reaches A. A's edits still reach B's other files.
    fs::write(root_b.join("local_only.txt"), b"B's own").unwrap();
    fs::write(root_a.join("second.txt"), b"more from A").unwrap();
    let arrived = wait_for(CONVERGE, || {
        fs::read(root_b.join("second.txt")).is_ok_and(|d| d == b"more from A")
    });
    assert!(arrived.is_some(), "{}", b.log());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !root_a.join("local_only.txt").exists(),
        "a view-only device's file reached A"
    );
    drop(a);
}

#[test]
fn files_refused_under_a_local_file_arrive_once_the_user_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = dir.path().join("folder_a");
    let root_b = dir.path().join("folder_b");
    fs::create_dir_all(root_a.join("d")).unwrap();
    fs::write(root_a.join("d/f.txt"), b"first").unwrap();
    let (a, b) = share_view_only(dir.path(), &root_a, &root_b);
    // B, view-only, replaces the directory `d` with a file of its own: a local change
    // that stays local.
    fs::remove_dir_all(root_b.join("d")).unwrap();
    fs::write(root_b.join("d"), b"B's own file d").unwrap();
    let listed = wait_for(CONVERGE, || {
        b.status()
            .folders
            .iter()
            .any(|f| f.local_only.iter().any(|p| p == "d"))
    });
    assert!(listed.is_some(), "B did not list d as local:\n{}", b.log());
    // A edits the file in its directory `d`: B must refuse it while its file stands.
    fs::write(root_a.join("d/f.txt"), b"second, from A").unwrap();
    let refused = wait_for(CONVERGE, || {
        b.log()
            .lines()
            .any(|line| line.contains("refused") && line.contains("d/f.txt"))
    });
    assert!(refused.is_some(), "B did not refuse d/f.txt:\n{}", b.log());
    assert!(root_b.join("d").is_file(), "{}", b.log());
    // The user deletes the file: the directory and the file refused under it come at
    // once (not at the next full scan, a day away in these tests).
    fs::remove_file(root_b.join("d")).unwrap();
    let arrived = wait_for(CONVERGE, || {
        fs::read(root_b.join("d/f.txt")).is_ok_and(|data| data == b"second, from A")
    });
    assert!(arrived.is_some(), "{}", b.log());
    drop(a);
}

#[test]
fn directory_modes_sync_both_ways() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root_a = dir.path().join("folder_a");
    let root_b = dir.path().join("folder_b");
    fs::create_dir_all(root_a.join("private/inner")).unwrap();
    fs::write(root_a.join("private/inner/f.txt"), b"x").unwrap();
    fs::set_permissions(root_a.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.path().join("home_a"), &config);
    let b = TestNode::start(&dir.path().join("home_b"), &config);
    share_along(&[&a, &b], &[&root_a, &root_b], "modes");
    wait_converged(&[&root_a, &root_b], &[&a, &b], CONVERGE);
    let mode = |path: &std::path::Path| {
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    };
    let arrived = wait_for(CONVERGE, || mode(&root_b.join("private")) == 0o700);
    assert!(
        arrived.is_some(),
        "B's directory mode is {:o}:\n{}",
        mode(&root_b.join("private")),
        b.log()
    );
    // A change of mode on B goes back to A.
    fs::set_permissions(
        root_b.join("private/inner"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let back = wait_for(CONVERGE, || mode(&root_a.join("private/inner")) == 0o750);
    assert!(
        back.is_some(),
        "A's directory mode is {:o}:\n{}",
        mode(&root_a.join("private/inner")),
        a.log()
    );
}

#[test]
fn a_peer_restarted_by_kill_9_gets_a_new_session_and_the_old_connection_goes_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = dir.path().join("folder_a");
    let root_b = dir.path().join("folder_b");
    fs::create_dir_all(&root_a).unwrap();
    fs::write(root_a.join("one.txt"), b"before the restart").unwrap();
    let config = NodeConfig::default();
    let a = TestNode::start(&dir.path().join("home_a"), &config);
    let b = TestNode::start(&dir.path().join("home_b"), &config);
    share_along(&[&a, &b], &[&root_a, &root_b], "restart");
    wait_converged(&[&root_a, &root_b], &[&a, &b], CONVERGE);

    // B dies without a word: over QUIC, A's connection to it lingers until its idle
    // timeout (10 s) while the restarted B dials A on a new one.
    let b_home = b.home.clone();
    b.kill9();
    let before_restart = a.log().len();
    let b = TestNode::start(&b_home, &config);
    fs::write(root_a.join("two.txt"), b"after the restart").unwrap();
    wait_converged(&[&root_a, &root_b], &[&a, &b], CONVERGE);
    // Past the old connection's idle timeout: its end must not take the new one down.
    std::thread::sleep(Duration::from_secs(13));
    fs::write(root_a.join("three.txt"), b"after the timeout").unwrap();
    let tree = wait_converged(&[&root_a, &root_b], &[&a, &b], CONVERGE);
    assert!(tree.contains_key("two.txt") && tree.contains_key("three.txt"));

    let log = a.log();
    let since = &log[before_restart..];
    let dropped: Vec<&str> = since
        .lines()
        .filter(|line| line.contains("disconnect"))
        .collect();
    assert!(
        dropped.is_empty(),
        "A dropped B after B's restart:\n{}\n\nA's log since the restart:\n{since}\n\nB's log:\n{}",
        dropped.join("\n"),
        b.log()
    );
    assert!(
        since.contains("new session starts"),
        "A did not notice B's new session:\n{since}"
    );
}

/// Milliseconds since the Unix epoch (the clock of the nodes' `last_scan_ms`).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Whether `root` holds a regular file (Weft's temp files aside) anywhere below it.
fn holds_a_file(root: &std::path::Path) -> bool {
    let Ok(entries) = fs::read_dir(root) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => holds_a_file(&entry.path()),
            Ok(kind) => kind.is_file() && !name.to_string_lossy().starts_with(".weft"),
            Err(_) => false,
        }
    })
}

#[test]
fn a_peer_gets_the_first_files_of_a_long_first_scan_before_the_scan_ends() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = dir.path().join("folder_a");
    let root_b = dir.path().join("folder_b");
    write_tree(&root_a, 12_000, 3_000, 41);
    // No watcher on A: its first scan is the folder's only one.
    let quiet = NodeConfig {
        watch: false,
        ..NodeConfig::default()
    };
    let a = TestNode::start(&dir.path().join("home_a"), &quiet);
    let b = TestNode::start(&dir.path().join("home_b"), &NodeConfig::default());
    share_along(&[&a, &b], &[&root_a, &root_b], "long");
    let arrived = wait_for(CONVERGE, || holds_a_file(&root_b));
    assert!(arrived.is_some(), "nothing reached B:\n{}", b.log());
    let first_file_ms = now_ms();
    // A's scan ended after B had a file: A answered B between its scan batches.
    let scanned = wait_for(CONVERGE, || {
        a.status()
            .folders
            .iter()
            .any(|f| f.id == "long" && f.scans >= 1)
    });
    assert!(scanned.is_some(), "A's scan never finished:\n{}", a.log());
    let folder = a.status().folders.into_iter().find(|f| f.id == "long");
    let scan_end_ms = folder.map_or(0, |f| f.last_scan_ms);
    assert!(
        first_file_ms < scan_end_ms,
        "B's first file came {} ms after A's scan ended",
        first_file_ms.saturating_sub(scan_end_ms)
    );
    let paths = [root_a.as_path(), root_b.as_path()];
    let tree = wait_converged(&paths, &[&a, &b], CONVERGE);
    assert!(tree.len() > 12_000, "{} paths", tree.len());
}

/// Writes `contents` into `path` in place (same inode) and gives it the mtime `mtime`.
fn write_with_mtime(path: &std::path::Path, contents: &[u8], mtime: std::time::SystemTime) {
    fs::write(path, contents).unwrap();
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// Waits for the start of the next two seconds of the clock (FAT's mtime buckets) and
/// returns the mtime FAT gives every write in them, and when they started.
fn next_fat_bucket() -> (std::time::SystemTime, std::time::Instant) {
    use std::time::{Instant, SystemTime, UNIX_EPOCH};
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into_bucket = Duration::from_nanos((since_epoch.as_nanos() % 2_000_000_000) as u64);
    if into_bucket > Duration::from_millis(100) {
        std::thread::sleep(Duration::from_secs(2) - into_bucket);
    }
    let started = Instant::now();
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let bucket = UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs() / 2 * 2);
    (bucket, started)
}

/// On FAT two writes have the same mtime only while the clock stays in the same two
/// seconds: an attempt that took longer (a loaded machine) says nothing.
const SAME_BUCKET: Duration = Duration::from_millis(1500);

/// At the start of the next FAT bucket, writes "first version" to `on_a` with the
/// bucket's mtime, runs `scan`, and waits until B has it at `on_b`. Returns the bucket's
/// mtime and when it started.
fn first_version_in_a_fat_bucket(
    on_a: &std::path::Path,
    on_b: &std::path::Path,
    b: &TestNode,
    scan: impl Fn(),
) -> (std::time::SystemTime, std::time::Instant) {
    let (bucket, started) = next_fat_bucket();
    write_with_mtime(on_a, b"first version", bucket);
    scan();
    let first = wait_for(Duration::from_secs(20), || {
        fs::read(on_b).is_ok_and(|bytes| bytes == b"first version")
    });
    assert!(
        first.is_some(),
        "the first write never reached B:\n{}",
        b.log()
    );
    (bucket, started)
}

/// Waits until `path` holds `bytes`; fails, naming `what` and showing both logs, if
/// it does not within [`CONVERGE`].
fn assert_arrives(
    path: &std::path::Path,
    bytes: &[u8],
    what: &str,
    (a, b): (&TestNode, &TestNode),
) {
    let arrived = wait_for(CONVERGE, || fs::read(path).is_ok_and(|held| held == bytes));
    assert!(
        arrived.is_some(),
        "{what} never reached B:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
}

/// On a filesystem with coarse timestamps (FAT: 2 s; HFS+ and ext3: 1 s; ext4 before
/// Linux 6.13: one clock tick), a second write of the same size soon after the first
/// gets the same mtime as the first, so size, mtime and inode all match what the scan
/// of the first write recorded. Emulated here by giving both writes the mtime FAT would
/// (the even second before the first write): the second write must still reach B.
#[test]
fn a_same_size_write_within_the_timestamp_granularity_still_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (roots, a, b) = pair_sharing_x(dir.path(), &NodeConfig::default());
    for attempt in 0..5 {
        let name = format!("coarse{attempt}.txt");
        let (on_a, on_b) = (roots[0].join(&name), roots[1].join(&name));
        let (bucket, started) = first_version_in_a_fat_bucket(&on_a, &on_b, &b, || {});
        write_with_mtime(&on_a, b"other version", bucket);
        if started.elapsed() > SAME_BUCKET {
            continue;
        }
        assert_arrives(
            &on_b,
            b"other version",
            "the second write (same size, same mtime)",
            (&a, &b),
        );
        return;
    }
    panic!("no attempt wrote twice within two seconds; the machine is too loaded for this test");
}

/// A node without a watcher: only the scans a test asks for see its changes.
const UNWATCHED: NodeConfig = NodeConfig {
    watch: false,
    debounce_ms: 100,
    full_rescan_interval_s: 86_400,
    temp_file_expiry_s: 86_400,
    user_home: None,
};

/// A (unwatched) and B sharing the empty folder `label`: their roots, A, B.
fn unwatched_a_with_b(
    dir: &std::path::Path,
    label: &str,
) -> (Vec<std::path::PathBuf>, TestNode, TestNode) {
    pair(dir, label, (&UNWATCHED, &NodeConfig::default()), |_| {})
}

/// The same kind of write made while the node is down, after a scan that found the
/// file racily clean: the mark is in the store, so the first scan after the restart
/// hashes the file again.
#[test]
fn a_racily_clean_file_is_hashed_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (roots, a, b) = unwatched_a_with_b(dir.path(), "restart");
    let mut a = a;
    let home_a = a.home.clone();
    for attempt in 0..5 {
        let name = format!("coarse{attempt}.txt");
        let (on_a, on_b) = (roots[0].join(&name), roots[1].join(&name));
        let (bucket, started) = first_version_in_a_fat_bucket(&on_a, &on_b, &b, || {
            a.scan("restart");
        });
        assert!(a.stop(), "A did not stop cleanly");
        write_with_mtime(&on_a, b"other version", bucket);
        let in_bucket = started.elapsed() <= SAME_BUCKET;
        a = TestNode::start(&home_a, &UNWATCHED);
        if !in_bucket {
            continue;
        }
        assert_arrives(
            &on_b,
            b"other version",
            "the write made while A was down",
            (&a, &b),
        );
        return;
    }
    panic!("no attempt wrote twice within two seconds; the machine is too loaded for this test");
}

/// The same kind of write, unseen by any scan yet (A has no watcher), when a peer's
/// edit of the file arrives: A must not replace its bytes on the strength of their
/// unchanged metadata. Both versions survive, one as a conflict copy.
#[test]
fn a_peer_edit_does_not_replace_a_same_size_write_the_metadata_cannot_show() {
    let dir = tempfile::tempdir().unwrap();
    let (roots, a, b) = unwatched_a_with_b(dir.path(), "racy");
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    for attempt in 0..5 {
        let name = format!("coarse{attempt}.txt");
        let (on_a, on_b) = (roots[0].join(&name), roots[1].join(&name));
        let (bucket, started) = first_version_in_a_fat_bucket(&on_a, &on_b, &b, || {
            a.scan("racy");
        });
        write_with_mtime(&on_a, b"A's version!!", bucket);
        fs::write(&on_b, b"B's later version").unwrap();
        // B's edit must reach A before A's second look at the racy file (two seconds
        // after its scan): A's file must then be the one B's edit finds.
        let arrived = wait_for(Duration::from_secs(20), || {
            a.files("racy")
                .iter()
                .any(|f| f.path == name && f.entry.size == 17)
        });
        assert!(arrived.is_some(), "B's edit never reached A:\n{}", a.log());
        if started.elapsed() > SAME_BUCKET {
            continue;
        }
        let tree = wait_converged(&paths, &[&a, &b], CONVERGE);
        let hash = |bytes: &[u8]| blake3::hash(bytes).to_hex().to_string();
        let mut versions: Vec<&String> = tree
            .iter()
            .filter(|(path, _)| path.starts_with(&format!("coarse{attempt}")))
            .map(|(_, digest)| digest)
            .collect();
        versions.sort();
        let mut want = [hash(b"A's version!!"), hash(b"B's later version")];
        want.sort();
        assert_eq!(
            versions,
            want.iter().collect::<Vec<_>>(),
            "{tree:#?}\nA:\n{}",
            a.log()
        );
        return;
    }
    panic!("no attempt wrote twice within two seconds; the machine is too loaded for this test");
}

/// The lines of an strace log (`-f`: each begins with the thread ID).
struct Trace(Vec<String>);

impl Trace {
    fn read(path: &std::path::Path) -> Trace {
        Trace(
            fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect(),
        )
    }

    /// The first line from `from` on that holds every one of `parts`: its index and
    /// thread ID.
    fn find(&self, from: usize, parts: &[&str]) -> Option<(usize, String)> {
        self.0
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, line)| parts.iter().all(|part| line.contains(part)))
            .map(|(index, line)| (index, line.split(' ').next().unwrap_or("").to_owned()))
    }

    /// The first line from `from` on that holds every one of `parts`, or a panic.
    fn line_of(&self, from: usize, parts: &[&str]) -> (usize, String) {
        self.find(from, parts).unwrap_or_else(|| {
            panic!(
                "no line with {parts:?} in the trace from line {from}:\n{}",
                self.0.join("\n")
            )
        })
    }

    /// The store's first sync after line `from` on `thread` (the folder actor's commit).
    fn commit_after(&self, from: usize, thread: &str) -> usize {
        self.0
            .iter()
            .enumerate()
            .skip(from + 1)
            .find(|(_, line)| {
                line.starts_with(&format!("{thread} "))
                    && (line.contains("fsync(") || line.contains("fdatasync("))
                    && line.contains("weft.redb>")
            })
            .map(|(index, _)| index)
            .unwrap_or_else(|| panic!("no store commit after line {from}"))
    }

    /// Asserts that `dir` was synced after line `after` and before line `before`.
    fn assert_synced(&self, dir: &str, after: usize, before: usize) {
        let synced = self.find(after + 1, &["fsync(", &format!("{dir}>")]);
        assert!(
            synced.is_some_and(|(index, _)| index < before),
            "{dir} was not synced between lines {after} and {before}:\n{}",
            self.0[after..=before].join("\n")
        );
    }

    /// Asserts that after the syscall `call` on `dir/name` the folder actor synced
    /// `dir` before its next store commit.
    fn assert_synced_before_commit(&self, call: &str, dir: &str, name: &str) {
        let (changed, actor) = self.line_of(0, &[call, &format!("{dir}/{name}\"")]);
        self.assert_synced(dir, changed, self.commit_after(changed, &actor));
    }
}

/// The processes a process started (strace's tracee), stopped with SIGTERM when this
/// is dropped: strace does not take its tracee down with it, even when killed.
struct TraceeGuard {
    pid: u32,
    stopped: std::cell::Cell<bool>,
}

impl TraceeGuard {
    fn new(pid: u32) -> Self {
        TraceeGuard {
            pid,
            stopped: std::cell::Cell::new(false),
        }
    }

    /// Stops the tracees and waits (up to 30 s each) until they are gone; once only
    /// (the tracer's PID may belong to another process afterwards).
    fn stop(&self) {
        if self.stopped.replace(true) {
            return;
        }
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .unwrap_or_default();
        if children.trim().is_empty() {
            // A kernel without /proc/PID/task/TID/children: by parent instead.
            let _ = std::process::Command::new("pkill")
                .args(["-TERM", "-P", &self.pid.to_string()])
                .status();
        }
        for pid in children.split_whitespace() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", pid])
                .status();
            wait_for(Duration::from_secs(30), || {
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
            });
        }
    }
}

impl Drop for TraceeGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether strace can trace here (installed, and ptrace allowed).
fn strace_works() -> bool {
    std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A file a peer sent is renamed into place (in an existing directory and in new
/// ones), and one a peer deleted is unlinked, and each directory they changed is
/// synced before the store records the change: on filesystems that do not write a
/// rename with a later fsync of another file (ext4 without a journal, btrfs), a power
/// loss could otherwise undo the rename after the store recorded it, and the old file
/// would read as this device's edit. B runs under strace; the order of its syscalls is
/// the evidence (a power loss cannot be staged here).
#[test]
fn a_change_put_on_disk_is_durable_in_its_directory_before_the_store_records_it() {
    if !strace_works() {
        println!(
            "SKIPPED a_change_put_on_disk_is_durable_in_its_directory_before_the_store_records_it: strace is not installed or cannot trace here (apt-get install strace)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The node's paths are canonical; so are the ones looked for in the trace.
    let base = dir.path().canonicalize().unwrap();
    let roots: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| base.join(format!("folder_{n}")))
        .collect();
    fs::create_dir_all(roots[0].join("deep/er")).unwrap();
    fs::write(roots[0].join("deep/er/gone.txt"), b"deleted on A later").unwrap();
    let a = TestNode::start(&base.join("home_a"), &NodeConfig::default());
    let trace_path = base.join("b.strace");
    let trace_arg = trace_path.to_string_lossy().into_owned();
    let b = TestNode::start_with(
        &base.join("home_b"),
        &NodeConfig::default(),
        &[
            "strace",
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,fsync,fdatasync",
            "-o",
            &trace_arg,
        ],
    );
    let tracee = TraceeGuard::new(b.pid());
    let paths: Vec<&std::path::Path> = roots.iter().map(|r| r.as_path()).collect();
    share_along(&[&a, &b], &paths, "durable");
    wait_converged(&paths, &[&a, &b], CONVERGE);
    fs::write(roots[0].join("deep/er/file.txt"), b"made on A").unwrap();
    fs::remove_file(roots[0].join("deep/er/gone.txt")).unwrap();
    fs::create_dir_all(roots[0].join("new/sub")).unwrap();
    fs::write(roots[0].join("new/sub/made.txt"), b"in new directories").unwrap();
    wait_converged(&paths, &[&a, &b], CONVERGE);
    // The changes recorded in B's store (its API answers from it).
    let recorded = wait_for(CONVERGE, || {
        let files = b.files("durable");
        let has = |path: &str| files.iter().any(|f| f.path == path);
        has("deep/er/file.txt") && has("new/sub/made.txt") && !has("deep/er/gone.txt")
    });
    assert!(recorded.is_some(), "B's store did not record the changes");
    tracee.stop();
    // strace ends with its tracee and has then written all of its log.
    assert!(b.stop(), "B did not stop cleanly");
    let trace = Trace::read(&trace_path);
    let folder_b = roots[1].to_string_lossy().into_owned();
    let deep_er = format!("{folder_b}/deep/er");
    trace.assert_synced_before_commit("rename", &deep_er, "file.txt");
    trace.assert_synced_before_commit("unlink", &deep_er, "gone.txt");
    // A file in new directories: its directory before the commit that records it, and
    // each new directory's parent after the directory was made.
    let (new, new_sub) = (format!("{folder_b}/new"), format!("{folder_b}/new/sub"));
    trace.assert_synced_before_commit("rename", &new_sub, "made.txt");
    let (renamed, actor) = trace.line_of(0, &["rename", &format!("{new_sub}/made.txt\"")]);
    let commit = trace.commit_after(renamed, &actor);
    let (made_sub, _) = trace.line_of(0, &["mkdir", &format!("{new_sub}\""), " = 0"]);
    trace.assert_synced(&new, made_sub, commit);
    let (made_new, _) = trace.line_of(0, &["mkdir", &format!("{new}\""), " = 0"]);
    trace.assert_synced(&folder_b, made_new, commit);
}
