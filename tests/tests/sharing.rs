//! Sharing against a misbehaving device: modes from peers, revocation, invites and
//! floods from strangers, requesters that never read. The misbehaving devices are
//! protocol peers ([`crate::peer`]); the others are real `weft` processes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use weft_node::net;
use weft_protocol::chunk::build_manifest;
use weft_protocol::document::{self, Content, Entry, EntryKind, FolderDocument};
use weft_protocol::wire::{self, BlockRequest, DocSync, Hello, Invite, ManifestRequest, Message};
use weft_protocol::{ChunkParams, DeviceId, FolderId, RelPath};
use weft_tests::{NodeConfig, TestNode, connect, wait_converged, wait_for, weft};

use crate::peer::{Blocks, Peer, file_entry, stays_false};

/// Accepts `peer` on `node` and shares `folder` with it in `role`; returns once the
/// peer is connected and has the folder's history (so its changes build on it).
fn join(node: &TestNode, peer: &mut Peer, folder: &str, role: &str) -> FolderDocument {
    let id = peer.id.to_string();
    assert!(
        weft(
            &node.home,
            &["device", "add", &id, "--addr", &peer.address()]
        )
        .status
        .success()
    );
    let shared = weft(
        &node.home,
        &["folder", "share", folder, &id, "--perm", role],
    );
    assert!(shared.status.success(), "{shared:?}");
    let node_id: DeviceId = node.id().parse().unwrap();
    assert!(
        peer.connected(&node_id),
        "the peer never connected:\n{}",
        node.log()
    );
    let folder = FolderId::new(folder).unwrap();
    let mut doc = FolderDocument::new(document::actor_id(&peer.id, [7; 8]));
    for _ in 0..5 {
        peer.sync(node_id, &folder, &mut doc, 1);
        if doc.access_list().role(&peer.id).is_some() {
            return doc;
        }
    }
    panic!("the peer never received the access list:\n{}", node.log());
}

#[test]
fn a_peer_s_setuid_setgid_and_sticky_bits_never_reach_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    fs::create_dir_all(&root).unwrap();
    let node = TestNode::start(&dir.path().join("home"), &NodeConfig::default());
    node.add_folder(&root, "modes");
    let data = b"a program that would run as its owner".to_vec();
    let mut peer = Peer::start(71, Arc::new(Blocks(vec![data.clone()])));
    let mut doc = join(&node, &mut peer, "modes", "edit");
    let mut program = file_entry(peer.id, &data);
    program.mode = 0o4755;
    doc.put(&RelPath::new("suid").unwrap(), &program).unwrap();
    let directory = Entry {
        kind: EntryKind::Directory,
        deleted: false,
        size: 0,
        mtime_ns: 1_000_000_000,
        mode: 0o3777,
        content: Content::None,
        author: peer.id,
    };
    doc.put(&RelPath::new("shared-tmp").unwrap(), &directory)
        .unwrap();
    doc.commit(0, "modes");
    let node_id: DeviceId = node.id().parse().unwrap();
    let folder = FolderId::new("modes").unwrap();
    let arrived = wait_for(Duration::from_secs(60), || {
        peer.sync(node_id, &folder, &mut doc, 1);
        fs::read(root.join("suid")).is_ok_and(|bytes| bytes == data)
            && root.join("shared-tmp").is_dir()
    });
    assert!(
        arrived.is_some(),
        "the peer's entries never arrived:\n{}",
        node.log()
    );
    let mode = |path: &str| fs::metadata(root.join(path)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755, "setuid reached the disk");
    assert_eq!(
        mode("shared-tmp"),
        0o777,
        "setgid or sticky reached the disk"
    );
}

#[test]
fn after_unshare_a_device_gets_nothing_and_its_edits_never_appear() {
    let dir = tempfile::tempdir().unwrap();
    let (root_a, root_c) = (dir.path().join("a"), dir.path().join("c"));
    fs::create_dir_all(&root_a).unwrap();
    let kept = vec![3u8; 5_000];
    fs::write(root_a.join("kept.bin"), &kept).unwrap();
    let a = TestNode::start(&dir.path().join("home_a"), &NodeConfig::default());
    let c = TestNode::start(&dir.path().join("home_c"), &NodeConfig::default());
    connect(&a, &c);
    a.add_folder(&root_a, "gone");
    a.share_with("gone", &c, &root_c);
    wait_converged(&[&root_a, &root_c], &[&a, &c], Duration::from_secs(60));
    let late = b"written by the removed device".to_vec();
    let mut x = Peer::start(72, Arc::new(Blocks(vec![late.clone()])));
    let mut doc = join(&a, &mut x, "gone", "edit");
    // C may edit, not share: it is told so, and nothing changes.
    let refused = weft(&c.home, &["folder", "unshare", "gone", &x.id.to_string()]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("only owners and admins"), "{said}");
    let members = |node: &TestNode| -> String {
        let folders: serde_json::Value = node.client().get("/v1/folders").unwrap();
        folders[0]["devices"].to_string()
    };
    assert!(members(&a).contains(&x.id.to_string()), "{}", members(&a));
    let removed = weft(&a.home, &["folder", "unshare", "gone", &x.id.to_string()]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(!members(&a).contains(&x.id.to_string()), "{}", members(&a));
    assert!(String::from_utf8_lossy(&removed.stdout).contains("keeps what it already had"));
    // X goes on as if nothing happened: an edit on top of what it had, offered to A
    // (which redials it: X is still an accepted device, only not a member).
    doc.put(
        &RelPath::new("after.txt").unwrap(),
        &file_entry(x.id, &late),
    )
    .unwrap();
    doc.commit(0, "after its removal");
    let a_id: DeviceId = a.id().parse().unwrap();
    let folder = FolderId::new("gone").unwrap();
    assert!(x.connected(&a_id), "A never redialed X:\n{}", a.log());
    x.sync(a_id, &folder, &mut doc, 3);
    assert!(
        stays_false(|| root_a.join("after.txt").exists() || root_c.join("after.txt").exists()),
        "the removed device's edit appeared"
    );
    // Its block and manifest requests get nothing.
    let manifest = build_manifest(kept.as_slice(), &ChunkParams::DEFAULT, |_| {}).unwrap();
    let answers = x.runtime.block_on(async {
        let mut stream = x
            .net
            .open_raw_stream(&a_id, net::BLOCKS_PROTOCOL)
            .await
            .unwrap();
        let mut answers = Vec::new();
        for request in [
            Message::BlockRequest(BlockRequest {
                folder: folder.clone(),
                request_id: 1,
                hashes: manifest.blocks().iter().map(|b| b.hash).collect(),
            }),
            Message::ManifestRequest(ManifestRequest {
                folder: folder.clone(),
                request_id: 2,
                hashes: vec![manifest.hash()],
            }),
        ] {
            stream
                .write_all(&wire::encode(&request).unwrap())
                .await
                .unwrap();
            stream.flush().await.unwrap();
            let mut header = [0u8; 4];
            stream.read_exact(&mut header).await.unwrap();
            let mut payload = vec![0u8; wire::frame_len(header).unwrap()];
            stream.read_exact(&mut payload).await.unwrap();
            answers.push(wire::decode_payload(&payload).unwrap());
        }
        answers
    });
    assert!(
        matches!(answers[0], Message::BlockMissing(_)),
        "{:?}",
        answers[0]
    );
    assert!(
        matches!(&answers[1], Message::ManifestResponse(r) if r.manifest.is_none()),
        "{:?}",
        answers[1]
    );
    // What it already had, it keeps; the others go on.
    fs::write(root_a.join("after-unshare.txt"), b"still shared with C").unwrap();
    wait_converged(&[&root_a, &root_c], &[&a, &c], Duration::from_secs(60));
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// What a stranger's flood may add to the victim's peak memory: the control byte
/// budgets (256 MiB in all, 64 MiB per peer: one peer holds at most 64 MiB of frames,
/// plus the one it is reading) with room for the allocator.
const FLOOD_RSS_BOUND: u64 = 160 * 1024 * 1024;

#[test]
fn a_stranger_s_flood_is_bounded_and_an_invite_never_takes_a_directory_with_files() {
    let dir = tempfile::tempdir().unwrap();
    let user_home = dir.path().join("user");
    fs::create_dir_all(user_home.join("Documents")).unwrap();
    fs::write(user_home.join("Documents/tax.txt"), b"private").unwrap();
    let config = NodeConfig {
        user_home: Some(user_home.clone()),
        ..NodeConfig::default()
    };
    let victim = TestNode::start(&dir.path().join("home_v"), &config);
    let honest = TestNode::start(&dir.path().join("home_h"), &NodeConfig::default());
    // ~/Weft is the victim's default folder: an invite goes beside it, in ~/LABEL.
    victim.add_folder(&user_home.join("Weft"), "default");
    connect(&victim, &honest);
    let (root_w, root_hw) = (dir.path().join("work_v"), dir.path().join("work_h"));
    fs::create_dir_all(&root_w).unwrap();
    victim.add_folder(&root_w, "work");
    victim.share_with("work", &honest, &root_hw);
    let store = victim.home.join("weft.redb");
    let store_before = fs::metadata(&store).unwrap().len();
    let rss_before = peak_rss(victim.pid());

    // A stranger (never accepted) connects and floods its control stream: 100,000
    // invites labelled `Documents`, then 16 MiB frames.
    let stranger = Peer::start(73, Arc::new(Blocks(Vec::new())));
    let victim_id: DeviceId = victim.id().parse().unwrap();
    stranger
        .net
        .dial(&victim_id, vec![victim.address().parse().unwrap()]);
    assert!(
        stranger.connected(&victim_id),
        "the stranger never connected"
    );
    let sent = stranger.runtime.block_on(async {
        let Ok(mut stream) = stranger
            .net
            .open_raw_stream(&victim_id, net::CONTROL_PROTOCOL)
            .await
        else {
            return 0;
        };
        let hello = Message::Hello(Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            device_name: "stranger".into(),
            client_version: "flood".into(),
        });
        let mut sent = 0;
        let mut batch = wire::encode(&hello).unwrap();
        for i in 0..100_000u32 {
            let invite = Message::Invite(Invite {
                folder: FolderId::new(&format!("docs-{i}")).unwrap(),
                label: "Documents".into(),
                params: ChunkParams::DEFAULT,
                role: wire::Role::Edit,
                founder: stranger.id,
            });
            wire::encode_into(&invite, &mut batch).unwrap();
            if batch.len() > 1 << 20 {
                if stream.write_all(&batch).await.is_err() {
                    return sent;
                }
                batch.clear();
            }
            sent += 1;
        }
        if stream.write_all(&batch).await.is_err() {
            return sent;
        }
        let large = Message::DocSync(DocSync {
            folder: FolderId::new("work").unwrap(),
            sync_message: vec![0xab; wire::MAX_DOC_SYNC_LEN],
        });
        let large = wire::encode(&large).unwrap();
        for _ in 0..16 {
            let write = tokio::time::timeout(Duration::from_secs(20), stream.write_all(&large));
            if !matches!(write.await, Ok(Ok(()))) {
                break;
            }
        }
        let _ = stream.flush().await;
        sent
    });
    assert_eq!(sent, 100_000, "the flood did not get out");
    // Honest sync goes on meanwhile.
    fs::write(root_w.join("during.txt"), b"written during the flood").unwrap();
    let synced = wait_for(Duration::from_secs(60), || {
        root_hw.join("during.txt").exists()
    });
    assert!(synced.is_some(), "honest sync stopped:\n{}", victim.log());
    let invites: serde_json::Value = victim.client().get("/v1/invites").unwrap();
    assert_eq!(invites.as_array().map(Vec::len), Some(0), "{invites}");
    let store_after = fs::metadata(&store).unwrap().len();
    assert!(
        store_after <= store_before + (4 << 20),
        "the store grew from {store_before} to {store_after} bytes"
    );
    let rss_after = peak_rss(victim.pid());
    assert!(
        rss_after <= rss_before + FLOOD_RSS_BOUND,
        "peak RSS grew from {} MiB to {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );
    let pending: serde_json::Value = victim.client().get("/v1/devices/pending").unwrap();
    assert!(
        pending.to_string().contains(&stranger.id.to_string()),
        "{pending}"
    );

    // An accepted device's invite labelled `Documents`: shown with who sends it, and
    // accepted without --path it does not take ~/Documents, which holds files.
    let root_d = dir.path().join("Documents");
    fs::create_dir_all(&root_d).unwrap();
    fs::write(root_d.join("from_h.txt"), b"the honest device's document").unwrap();
    honest.add_folder(&root_d, "docs");
    let shared = weft(&honest.home, &["folder", "share", "docs", &victim.id()]);
    assert!(shared.status.success());
    let listed = wait_for(Duration::from_secs(30), || {
        let out = weft(&victim.home, &["invites"]);
        String::from_utf8_lossy(&out.stdout).contains(&honest.id())
    });
    assert!(listed.is_some());
    let listing = String::from_utf8_lossy(&weft(&victim.home, &["invites"]).stdout).into_owned();
    assert!(
        listing.contains("Documents") && listing.contains("edit"),
        "{listing}"
    );
    let accept = weft(&victim.home, &["invites", "accept", "docs"]);
    assert!(
        !accept.status.success(),
        "accepted into a directory with files"
    );
    let said = String::from_utf8_lossy(&accept.stderr);
    assert!(
        said.contains("--path") && said.contains("Documents"),
        "{said}"
    );
    assert_eq!(
        fs::read(user_home.join("Documents/tax.txt")).unwrap(),
        b"private"
    );
    assert!(
        stays_false(|| root_d.join("tax.txt").exists()),
        "a file of ~/Documents reached the inviter"
    );
}

#[test]
fn requesters_that_never_read_do_not_stop_an_honest_download() {
    let dir = tempfile::tempdir().unwrap();
    let (root_a, root_b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&root_a).unwrap();
    let mut data = vec![0u8; 24 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    fs::write(root_a.join("big.bin"), &data).unwrap();
    let manifest = build_manifest(data.as_slice(), &ChunkParams::DEFAULT, |_| {}).unwrap();
    let hashes: Vec<_> = manifest.blocks().iter().map(|b| b.hash).collect();
    let a = TestNode::start(&dir.path().join("home_a"), &NodeConfig::default());
    let b = TestNode::start(&dir.path().join("home_b"), &NodeConfig::default());
    a.add_folder(&root_a, "big");
    let scanned = wait_for(Duration::from_secs(30), || {
        a.files("big").iter().any(|f| f.path == "big.bin")
    });
    assert!(scanned.is_some());
    let a_id: DeviceId = a.id().parse().unwrap();
    let folder = FolderId::new("big").unwrap();
    // Six members ask for every block on two streams each, and never read. They speak
    // TCP, whose stream windows (256 KiB) fill at once: A's writes to them stall.
    let mut stalled = Vec::new();
    let mut peers = Vec::new();
    for seed in 90..96u8 {
        let mut peer = Peer::start_on(seed, Arc::new(Blocks(Vec::new())), "/ip4/127.0.0.1/tcp/0");
        join(&a, &mut peer, "big", "view");
        for stream in 0..2u64 {
            let request = Message::BlockRequest(BlockRequest {
                folder: folder.clone(),
                request_id: stream,
                hashes: hashes.clone(),
            });
            let opened = peer.runtime.block_on(async {
                let mut opened = peer
                    .net
                    .open_raw_stream(&a_id, net::BLOCKS_PROTOCOL)
                    .await
                    .ok()?;
                opened.write_all(&wire::encode(&request).ok()?).await.ok()?;
                opened.flush().await.ok()?;
                Some(opened)
            });
            stalled.extend(opened);
        }
        peers.push(peer);
    }
    assert_eq!(stalled.len(), 12, "not every stalled request was sent");
    connect(&a, &b);
    a.share_with("big", &b, &root_b);
    wait_converged(&[&root_a, &root_b], &[&a, &b], Duration::from_secs(180));
    drop(stalled);
}

#[test]
fn a_view_device_s_edits_are_refused_and_an_editor_s_change_it_relays_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (root_a, root_c) = (dir.path().join("a"), dir.path().join("c"));
    fs::create_dir_all(&root_a).unwrap();
    fs::write(root_a.join("start.txt"), b"from A").unwrap();
    let a = TestNode::start(&dir.path().join("home_a"), &NodeConfig::default());
    let c_home = dir.path().join("home_c");
    let c = TestNode::start(&c_home, &NodeConfig::default());
    connect(&a, &c);
    a.add_folder(&root_a, "chain");
    a.share_as("chain", &c, &root_c, "admin");
    wait_converged(&[&root_a, &root_c], &[&a, &c], Duration::from_secs(60));
    let admin = wait_for(Duration::from_secs(30), || {
        c.status()
            .folders
            .iter()
            .any(|f| f.role.as_deref() == Some("admin"))
    });
    assert!(admin.is_some(), "C never became an admin:\n{}", c.log());
    // B, view-only, joins through C (a chain A - C - B) and is modified to publish.
    let from_c = b"written on C, an editor".to_vec();
    let vandal = b"written on B, which may only view".to_vec();
    let mut b = Peer::start(74, Arc::new(Blocks(vec![vandal.clone(), from_c.clone()])));
    let mut doc = join(&c, &mut b, "chain", "view");
    doc.put(
        &RelPath::new("vandal.txt").unwrap(),
        &file_entry(b.id, &vandal),
    )
    .unwrap();
    doc.commit(0, "an edit a view device may not make");
    let c_id: DeviceId = c.id().parse().unwrap();
    let folder = FolderId::new("chain").unwrap();
    // Offered until C has refused it (C disconnects B, and redials it).
    let flagged = wait_for(Duration::from_secs(60), || {
        b.sync(c_id, &folder, &mut doc, 1);
        c.status()
            .folders
            .iter()
            .any(|f| f.refused.iter().any(|r| r.device == b.id.to_string()))
    });
    assert!(flagged.is_some(), "C did not flag B:\n{}", c.log());
    assert!(
        stays_false(|| root_a.join("vandal.txt").exists() || root_c.join("vandal.txt").exists()),
        "the view device's edit was applied"
    );
    let listed = String::from_utf8_lossy(&weft(&c.home, &["device", "list"]).stdout).into_owned();
    assert!(listed.contains("FLAGGED"), "{listed}");
    // Honest sync goes on.
    fs::write(root_a.join("after.txt"), b"still syncing").unwrap();
    wait_converged(&[&root_a, &root_c], &[&a, &c], Duration::from_secs(60));

    // A change authored by the editor C reaches A only through B, with C's signature.
    let a_home = a.home.clone();
    assert!(
        weft(
            &a.home,
            &["device", "add", &b.id.to_string(), "--addr", &b.address()]
        )
        .status
        .success()
    );
    a.kill9();
    let mut doc = FolderDocument::new(document::actor_id(&b.id, [8; 8]));
    b.sync(c_id, &folder, &mut doc, 2);
    fs::write(root_c.join("from_c.txt"), &from_c).unwrap();
    let relayed = wait_for(Duration::from_secs(30), || {
        b.sync(c_id, &folder, &mut doc, 1);
        doc.get(&RelPath::new("from_c.txt").unwrap())
            .ok()
            .flatten()
            .is_some()
    });
    assert!(
        relayed.is_some(),
        "B never received C's change:\n{}",
        c.log()
    );
    c.kill9();
    let a = TestNode::start(&a_home, &NodeConfig::default());
    let a_id: DeviceId = a.id().parse().unwrap();
    assert!(b.connected(&a_id), "A never dialed B:\n{}", a.log());
    let arrived = wait_for(Duration::from_secs(60), || {
        b.sync(a_id, &folder, &mut doc, 1);
        fs::read(root_a.join("from_c.txt")).is_ok_and(|bytes| bytes == from_c)
    });
    assert!(
        arrived.is_some(),
        "C's change relayed by B was not taken:\n{}",
        a.log()
    );
    let _ = c_home;
}
