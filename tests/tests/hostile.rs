//! A hostile peer, written with `weft-protocol` and the node's own network layer:
//! an accepted device that misbehaves in every way the wire allows, and an unknown
//! device. The honest node refuses each attack with a logged reason, writes nothing
//! outside its folder, keeps running, and keeps syncing with an honest peer.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use futures::AsyncWriteExt;
use weft_node::net::{self, BlockSource, NetConfig, NetEvent};
use weft_protocol::document::{self, FolderDocument, SyncState};
use weft_protocol::wire::{DocSync, Message};
use weft_protocol::{BlockHash, DeviceId, DeviceKey, FolderId, Manifest, ManifestHash};
use weft_tests::{NodeConfig, TestNode, connect, wait_for, weft};

use crate::peer::{file_entry, send_signed, sync_for, sync_until_member};

/// Serves wrong bytes for every block it is asked for, except the one of `honest`.
struct LyingSource {
    honest: Vec<u8>,
}

impl BlockSource for LyingSource {
    fn authorised(&self, _: &DeviceId, _: &FolderId) -> bool {
        true
    }
    fn block(&self, _: &FolderId, hash: &BlockHash) -> Option<Vec<u8>> {
        if *hash == BlockHash::of(&self.honest) {
            return Some(self.honest.clone());
        }
        Some(b"these are not the bytes you are looking for".to_vec())
    }
    fn manifest(&self, _: &FolderId, _: &ManifestHash) -> Option<Manifest> {
        None
    }
}

#[test]
fn a_hostile_peer_is_refused_and_honest_peers_keep_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let root_v = dir.path().join("victim/folder");
    let root_h = dir.path().join("honest");
    let secret_root = dir.path().join("victim/secret");
    fs::create_dir_all(&root_v).unwrap();
    fs::create_dir_all(&secret_root).unwrap();
    fs::write(root_v.join("kept.txt"), b"the victim's file").unwrap();
    fs::write(secret_root.join("private.txt"), b"never shared").unwrap();
    let config = NodeConfig::default();
    let victim = TestNode::start(&dir.path().join("home_v"), &config);
    let honest = TestNode::start(&dir.path().join("home_h"), &config);
    connect(&victim, &honest);
    victim.add_folder(&root_v, "shared");
    victim.add_folder(&secret_root, "secret");
    victim.share_with("shared", &honest, &root_h);
    let victim_id: DeviceId = victim.id().parse().unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // One file the hostile peer serves correctly: it downloads in the same group as
    // the bad one and must not fail with it.
    let good = vec![5u8; 3000];
    let hostile_key = DeviceKey::from_secret_bytes([66; 32]);
    let hostile_id = hostile_key.device_id();
    let listen: net::Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
    let (hostile, mut events) = runtime.block_on(async {
        net::start(
            &hostile_key,
            NetConfig {
                listen: vec![listen],
                mdns: false,
            },
            Arc::new(LyingSource {
                honest: good.clone(),
            }),
        )
        .unwrap()
    });
    let listening = wait_for(Duration::from_secs(10), || {
        !hostile.listen_addresses().is_empty()
    });
    assert!(listening.is_some());
    let hostile_address = hostile.listen_addresses()[0].to_string();
    // The victim accepts the hostile device and shares the folder with it: it is an
    // accepted device that misbehaves.
    let output = weft(
        &victim.home,
        &[
            "device",
            "add",
            &hostile_id.to_string(),
            "--addr",
            &hostile_address,
        ],
    );
    assert!(output.status.success());
    let output = weft(
        &victim.home,
        &["folder", "share", "shared", &hostile_id.to_string()],
    );
    assert!(output.status.success());
    let up = wait_for(Duration::from_secs(30), || hostile.is_connected(&victim_id));
    assert!(
        up.is_some(),
        "hostile peer never connected:\n{}",
        victim.log()
    );

    let folder = FolderId::new("shared").unwrap();
    let secret = FolderId::new("secret").unwrap();
    let mut doc = FolderDocument::new(document::actor_id(&hostile_id, [9; 8]));
    // It joins the folder's history first (the access list that makes it an editor):
    // a change on any other history is refused outright.
    assert!(
        sync_until_member(
            &runtime,
            &hostile,
            &mut events,
            victim_id,
            &folder,
            &hostile_key,
            &mut doc,
            &hostile_id,
        ),
        "the hostile peer never received the folder's access list"
    );
    let planted = b"planted by the hostile peer";
    // 1. Paths that escape the folder, and one into the node's own metadata.
    for key in [
        "f/../escape.txt",
        "f//tmp/absolute.txt",
        "f/.weft/owned",
        "f/a/../../up.txt",
    ] {
        doc.automerge()
            .put(
                automerge_root(),
                key,
                file_entry(hostile_id, planted).encode(),
            )
            .unwrap();
    }
    // 2. A valid path whose blocks the hostile peer serves wrongly.
    doc.put(
        &weft_protocol::RelPath::new("bad.bin").unwrap(),
        &file_entry(hostile_id, &[7u8; 5000]),
    )
    .unwrap();
    doc.put(
        &weft_protocol::RelPath::new("good.bin").unwrap(),
        &file_entry(hostile_id, &good),
    )
    .unwrap();
    doc.commit(0, "attack");
    runtime.block_on(sync_for(
        &hostile,
        &mut events,
        victim_id,
        &folder,
        &hostile_key,
        &mut doc,
        3,
    ));

    // 3. Sync for a folder it was never invited to: ignored, and nothing comes back.
    let mut probe = FolderDocument::new(document::actor_id(&hostile_id, [8; 8]));
    runtime.block_on(sync_for(
        &hostile,
        &mut events,
        victim_id,
        &secret,
        &hostile_key,
        &mut probe,
        2,
    ));
    assert!(
        probe.is_empty(),
        "the hostile peer learned about a folder it was never invited to"
    );

    // 4. An oversized frame, then garbage, each on a fresh control stream.
    runtime.block_on(async {
        if let Ok(mut stream) = hostile
            .open_raw_stream(&victim_id, net::CONTROL_PROTOCOL)
            .await
        {
            let _ = stream.write_all(&u32::MAX.to_le_bytes()).await;
            let _ = stream.flush().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let reconnected = wait_for(Duration::from_secs(15), || hostile.is_connected(&victim_id));
    assert!(reconnected.is_some(), "the victim did not redial");
    runtime.block_on(async {
        if let Ok(mut stream) = hostile
            .open_raw_stream(&victim_id, net::CONTROL_PROTOCOL)
            .await
        {
            let _ = stream
                .write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8])
                .await;
            let _ = stream.flush().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    });

    // 5. A change that claims the honest device as its author, signed by the hostile
    //    key: refused as a whole, nothing of it applied.
    let reconnected = wait_for(Duration::from_secs(15), || hostile.is_connected(&victim_id));
    assert!(reconnected.is_some(), "the victim did not redial");
    let honest_id: DeviceId = honest.id().parse().unwrap();
    let mut forged = FolderDocument::new(document::actor_id(&honest_id, [3; 8]));
    forged
        .put(
            &weft_protocol::RelPath::new("forged.txt").unwrap(),
            &file_entry(honest_id, planted),
        )
        .unwrap();
    forged.commit(0, "in the honest device's name");
    // Each new sync session offers the forged change again: the third refusal without
    // an accepted change in between cuts the device off.
    for _ in 0..3 {
        runtime.block_on(sync_for(
            &hostile,
            &mut events,
            victim_id,
            &folder,
            &hostile_key,
            &mut forged,
            1,
        ));
    }

    // Nothing was written outside the folder or into reserved places.
    let outside = [
        dir.path().join("victim/escape.txt"),
        dir.path().join("escape.txt"),
        std::path::PathBuf::from("/tmp/absolute.txt"),
        root_v.join(".weft/owned"),
        dir.path().join("victim/up.txt"),
    ];
    for path in &outside {
        assert!(!path.exists(), "{} was written", path.display());
    }
    assert!(
        !root_v.join("bad.bin").exists(),
        "an unverified block was written"
    );
    let good_arrived = wait_for(Duration::from_secs(30), || {
        fs::read(root_v.join("good.bin")).is_ok_and(|b| b == good)
    });
    assert!(
        good_arrived.is_some(),
        "a file downloading beside one with a bad block did not arrive:\n{}",
        victim.log()
    );
    let log = victim.log();
    assert!(
        log.contains("paths are invalid"),
        "no log line for the invalid paths:\n{log}"
    );
    assert!(
        log.contains("failed verification"),
        "no log line for the bad block:\n{log}"
    );
    assert!(
        log.contains("not shared with that device"),
        "no log line for the foreign folder:\n{log}"
    );
    assert!(
        log.contains("bad control frame"),
        "no log line for the bad frames:\n{log}"
    );
    assert!(
        log.contains("not signed by") && log.contains("nothing of it was applied"),
        "no log line for the forged change:\n{log}"
    );
    // It kept offering the forged change: after three refusals it was cut off.
    assert!(
        log.contains("keeps sending changes without valid signatures; disconnecting"),
        "a device looping on refused changes was not disconnected:\n{log}"
    );
    // The document knows the hostile device's own signed entry, not the forged one.
    let versions = |name: &str| -> usize {
        let path = root_v.join(name);
        let output = weft(
            &victim.home,
            &["versions", path.to_str().unwrap(), "--json"],
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    };
    assert!(
        versions("bad.bin") > 0,
        "the signed entry is not in the document"
    );
    assert_eq!(
        versions("forged.txt"),
        0,
        "a change forged in another device's name was applied"
    );
    let devices: serde_json::Value = victim.client().get("/v1/devices").unwrap();
    let bad_blocks: u64 = devices
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["id"] == hostile_id.to_string())
        .filter_map(|d| d["connection"]["bad_blocks"].as_u64())
        .sum();
    assert!(bad_blocks > 0 || log.contains("failed verification"));

    // The victim still runs, and honest peers still sync both ways.
    fs::write(root_h.join("from_honest.txt"), b"still syncing").unwrap();
    let synced = wait_for(Duration::from_secs(30), || {
        fs::read(root_v.join("from_honest.txt")).is_ok_and(|b| b == b"still syncing")
    });
    assert!(synced.is_some(), "honest sync stopped:\n{}", victim.log());
    assert_eq!(
        fs::read(root_v.join("kept.txt")).unwrap(),
        b"the victim's file"
    );
    drop(hostile);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// automerge's root object, through the document's own re-export.
fn automerge_root() -> automerge::ObjId {
    automerge::ROOT
}

/// An unknown device is shown as pending and gets nothing.
#[test]
fn an_unknown_device_learns_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("private.txt"), b"private").unwrap();
    let victim = TestNode::start(&dir.path().join("home_v"), &NodeConfig::default());
    victim.add_folder(&root, "mine");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stranger_key = DeviceKey::from_secret_bytes([77; 32]);
    let stranger_id = stranger_key.device_id();
    let victim_id: DeviceId = victim.id().parse().unwrap();
    let (stranger, mut events) = runtime.block_on(async {
        net::start(
            &stranger_key,
            NetConfig {
                listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
                mdns: false,
            },
            Arc::new(LyingSource { honest: Vec::new() }),
        )
        .unwrap()
    });
    stranger.dial(&victim_id, vec![victim.address().parse().unwrap()]);
    let up = wait_for(Duration::from_secs(30), || {
        stranger.is_connected(&victim_id)
    });
    assert!(up.is_some(), "stranger could not connect");
    let pending = wait_for(Duration::from_secs(10), || {
        let pending: serde_json::Value = victim.client().get("/v1/devices/pending").unwrap();
        pending
            .as_array()
            .is_some_and(|p| p.iter().any(|d| d["id"] == stranger_id.to_string()))
    });
    assert!(pending.is_some(), "stranger not listed as pending");
    // It asks for the folder's document and its blocks: nothing comes back.
    let mut doc = FolderDocument::new(document::actor_id(&stranger_id, [1; 8]));
    let folder = FolderId::new("mine").unwrap();
    runtime.block_on(sync_for(
        &stranger,
        &mut events,
        victim_id,
        &folder,
        &stranger_key,
        &mut doc,
        2,
    ));
    assert!(doc.is_empty());
    let blocks = runtime
        .block_on(stranger.fetch_blocks(&victim_id, &folder, vec![BlockHash::of(b"private")]))
        .unwrap();
    assert_eq!(blocks, vec![(BlockHash::of(b"private"), None)]);
    assert!(victim.log().contains("not shared with that device"));
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Serves the blocks it was given, honestly.
struct Serving(std::collections::HashMap<BlockHash, Vec<u8>>);

impl BlockSource for Serving {
    fn authorised(&self, _: &DeviceId, _: &FolderId) -> bool {
        true
    }
    fn block(&self, _: &FolderId, hash: &BlockHash) -> Option<Vec<u8>> {
        self.0.get(hash).cloned()
    }
    fn manifest(&self, _: &FolderId, _: &ManifestHash) -> Option<Manifest> {
        None
    }
}

/// A sync message too large for one frame travels as `DocSyncPart` frames and a final
/// `DocSync`; the node reassembles it, applies it, and fetches the files it names.
/// Parts are made tiny here so that a few hundred entries make many of them.
#[test]
fn a_sync_message_sent_in_parts_is_reassembled_and_applied() {
    const FILES: usize = 300;
    const PART_LEN: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    fs::create_dir_all(&root).unwrap();
    let node = TestNode::start(&dir.path().join("home"), &NodeConfig::default());
    node.add_folder(&root, "parts");
    let node_id: DeviceId = node.id().parse().unwrap();

    let peer_key = DeviceKey::from_secret_bytes([55; 32]);
    let peer_id = peer_key.device_id();
    let contents: Vec<Vec<u8>> = (0..FILES)
        .map(|i| format!("file {i} sent in parts").into_bytes())
        .collect();
    let blocks = contents
        .iter()
        .map(|data| (BlockHash::of(data), data.clone()))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (peer, mut events) = runtime.block_on(async {
        net::start(
            &peer_key,
            NetConfig {
                listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
                mdns: false,
            },
            Arc::new(Serving(blocks)),
        )
        .unwrap()
    });
    let listening = wait_for(Duration::from_secs(10), || {
        !peer.listen_addresses().is_empty()
    });
    assert!(listening.is_some());
    let address = peer.listen_addresses()[0].to_string();
    let id = peer_id.to_string();
    assert!(
        weft(&node.home, &["device", "add", &id, "--addr", &address])
            .status
            .success()
    );
    assert!(
        weft(&node.home, &["folder", "share", "parts", &id])
            .status
            .success()
    );
    let up = wait_for(Duration::from_secs(30), || peer.is_connected(&node_id));
    assert!(up.is_some(), "peer never connected:\n{}", node.log());

    let folder = FolderId::new("parts").unwrap();
    let mut doc = FolderDocument::new(document::actor_id(&peer_id, [5; 8]));
    // The folder's history first: changes on any other are refused.
    assert!(sync_until_member(
        &runtime,
        &peer,
        &mut events,
        node_id,
        &folder,
        &peer_key,
        &mut doc,
        &peer_id,
    ));
    for (i, data) in contents.iter().enumerate() {
        let path = weft_protocol::RelPath::new(&format!("dir{}/file{i}.txt", i % 7)).unwrap();
        doc.put(&path, &file_entry(peer_id, data)).unwrap();
    }
    doc.commit(0, "many files");
    let mut parts_sent = 0;
    runtime.block_on(async {
        let mut state = SyncState::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut send = |doc: &mut FolderDocument, state: &mut SyncState| {
            let Some(bytes) = send_signed(&peer, node_id, &folder, &peer_key, doc, state) else {
                return;
            };
            let pieces: Vec<&[u8]> = bytes.chunks(PART_LEN).collect();
            for (index, piece) in pieces.iter().enumerate() {
                let sync = DocSync {
                    folder: folder.clone(),
                    sync_message: piece.to_vec(),
                };
                let frame = if index + 1 == pieces.len() {
                    Message::DocSync(sync)
                } else {
                    parts_sent += 1;
                    Message::DocSyncPart(sync)
                };
                peer.send(&node_id, frame).unwrap();
            }
        };
        send(&mut doc, &mut state);
        while Instant::now() < deadline && !root.join("dir0/file0.txt").exists() {
            if let Ok(Some(NetEvent::Message(from, Message::DocSync(sync), _))) =
                tokio::time::timeout(Duration::from_millis(200), events.recv()).await
                && from == node_id
                && sync.folder == folder
            {
                doc.receive_sync_message(&mut state, &sync.sync_message)
                    .unwrap();
                send(&mut doc, &mut state);
            }
        }
    });
    assert!(
        parts_sent > 10,
        "the message was not split ({parts_sent} parts)"
    );
    let all_there = wait_for(Duration::from_secs(30), || {
        contents.iter().enumerate().all(|(i, data)| {
            fs::read(root.join(format!("dir{}/file{i}.txt", i % 7))).is_ok_and(|b| &b == data)
        })
    });
    assert!(
        all_there.is_some(),
        "the files named in the parted message did not all arrive:\n{}",
        node.log()
    );
    drop(peer);
    runtime.shutdown_timeout(Duration::from_secs(1));
}
