//! Block requests between two real network stacks in one process (real libp2p over
//! TCP on 127.0.0.1): many requests made at once share streams, every caller gets
//! exactly its own blocks back, requests one after the other reuse one stream, and a
//! download asks a block one peer lacks of the next peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weft_node::net::{self, BlockSource, NetConfig, NetHandle};
use weft_protocol::document::{Content, Entry, EntryKind};
use weft_protocol::{
    BlockHash, BlockRef, DeviceId, DeviceKey, FolderId, Manifest, ManifestHash, RelPath,
};
use weft_tests::wait_for;

/// Serves blocks (and optionally one manifest) from memory, counts requests (one
/// authorisation per request) and records every block asked for.
struct Blocks {
    blocks: HashMap<BlockHash, Vec<u8>>,
    requests: AtomicUsize,
    asked: Mutex<Vec<BlockHash>>,
    /// The hashes of each block request, in order.
    batches: Mutex<Vec<Vec<BlockHash>>>,
    manifest: Mutex<Option<Manifest>>,
}

impl Blocks {
    fn new(blocks: HashMap<BlockHash, Vec<u8>>) -> Self {
        Self {
            blocks,
            requests: AtomicUsize::new(0),
            asked: Mutex::new(Vec::new()),
            batches: Mutex::new(Vec::new()),
            manifest: Mutex::new(None),
        }
    }

    fn asked(&self) -> Vec<BlockHash> {
        self.asked.lock().unwrap().clone()
    }
}

impl BlockSource for Blocks {
    fn authorised(&self, _: &DeviceId, _: &FolderId) -> bool {
        self.requests.fetch_add(1, Ordering::SeqCst);
        true
    }
    fn block(&self, _: &FolderId, hash: &BlockHash) -> Option<Vec<u8>> {
        self.asked.lock().unwrap().push(*hash);
        self.blocks.get(hash).cloned()
    }
    fn blocks(
        &self,
        device: &DeviceId,
        folder: &FolderId,
        hashes: &[BlockHash],
    ) -> Vec<Option<Vec<u8>>> {
        self.batches.lock().unwrap().push(hashes.to_vec());
        if !self.authorised(device, folder) {
            return Vec::new();
        }
        hashes.iter().map(|hash| self.block(folder, hash)).collect()
    }
    fn manifest(&self, _: &FolderId, hash: &ManifestHash) -> Option<Manifest> {
        let manifest = self.manifest.lock().unwrap();
        manifest.clone().filter(|m| m.hash() == *hash)
    }
}

fn start(runtime: &tokio::runtime::Runtime, seed: u8, source: Arc<Blocks>) -> NetHandle {
    let key = DeviceKey::from_secret_bytes([seed; 32]);
    let (handle, events) = runtime.block_on(async {
        net::start(
            &key,
            NetConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                mdns: false,
            },
            source,
        )
        .unwrap()
    });
    // Nobody reads the events here; keep the channel open.
    std::mem::forget(events);
    handle
}

/// A server holding `contents` and a client connected to it.
struct Pair {
    runtime: tokio::runtime::Runtime,
    server: NetHandle,
    server_source: Arc<Blocks>,
    client: NetHandle,
    server_id: DeviceId,
    client_id: DeviceId,
}

fn connected_pair(seed: u8, contents: &[Vec<u8>]) -> Pair {
    let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server_source = Arc::new(Blocks::new(
        contents
            .iter()
            .map(|c| (BlockHash::of(c), c.clone()))
            .collect(),
    ));
    let server = start(&runtime, seed, server_source.clone());
    let client = start(&runtime, seed + 1, Arc::new(Blocks::new(HashMap::new())));
    let server_id = DeviceKey::from_secret_bytes([seed; 32]).device_id();
    let client_id = DeviceKey::from_secret_bytes([seed + 1; 32]).device_id();
    let listening = wait_for(Duration::from_secs(10), || {
        !server.listen_addresses().is_empty()
    });
    assert!(listening.is_some(), "server does not listen");
    client.dial(&server_id, server.listen_addresses());
    let up = wait_for(Duration::from_secs(30), || client.is_connected(&server_id));
    assert!(up.is_some(), "client could not connect");
    Pair {
        runtime,
        server,
        server_source,
        client,
        server_id,
        client_id,
    }
}

fn numbered_blocks(count: u32) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            format!("block number {i} ")
                .repeat(1 + (i as usize % 50))
                .into_bytes()
        })
        .collect()
}

#[test]
fn block_requests_made_at_once_share_streams_and_each_caller_gets_its_own_blocks() {
    let contents = numbered_blocks(300);
    let Pair {
        runtime,
        server_source,
        client,
        server_id,
        ..
    } = connected_pair(31, &contents);
    let folder = FolderId::new("shared").unwrap();
    // 200 callers at once: most ask for one block, some for three, and every tenth
    // also for a block the server does not have.
    let unknown = BlockHash::of(b"nobody has this");
    let asks: Vec<Vec<BlockHash>> = (0..200usize)
        .map(|i| {
            let mut hashes = vec![BlockHash::of(&contents[i])];
            if i % 7 == 0 {
                hashes.push(BlockHash::of(&contents[200 + i % 100]));
                hashes.push(BlockHash::of(&contents[i / 2]));
            }
            if i % 10 == 0 {
                hashes.push(unknown);
            }
            hashes
        })
        .collect();
    let answers = runtime.block_on(async {
        let calls = asks
            .iter()
            .map(|hashes| client.fetch_blocks(&server_id, &folder, hashes.clone()));
        futures::future::join_all(calls).await
    });
    for (hashes, answer) in asks.iter().zip(answers) {
        let blocks = answer.expect("request failed");
        let got: Vec<BlockHash> = blocks.iter().map(|(hash, _)| *hash).collect();
        assert_eq!(&got, hashes, "a caller got someone else's blocks");
        for (hash, data) in blocks {
            if hash == unknown {
                assert_eq!(data, None);
            } else {
                let data = data.expect("a block the server has came back missing");
                assert_eq!(BlockHash::of(&data), hash);
            }
        }
    }
    let requests = server_source.requests.load(Ordering::SeqCst);
    assert!(
        requests < asks.len(),
        "{requests} requests for {} callers: nothing was shared",
        asks.len()
    );
    runtime.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn requests_one_after_the_other_reuse_one_stream() {
    let contents = numbered_blocks(40);
    let pair = connected_pair(41, &contents);
    let folder = FolderId::new("shared").unwrap();
    for content in &contents {
        let hash = BlockHash::of(content);
        let answer = pair
            .runtime
            .block_on(
                pair.client
                    .fetch_blocks(&pair.server_id, &folder, vec![hash]),
            )
            .expect("request failed");
        assert_eq!(answer, vec![(hash, Some(content.clone()))]);
    }
    let seen = pair
        .server
        .peers()
        .into_iter()
        .find(|peer| peer.device_id == pair.client_id.to_string())
        .expect("the server lists the client");
    assert_eq!(seen.requests_in, contents.len() as u64);
    assert_eq!(
        seen.request_streams_in, 1,
        "{} requests one after the other came on {} streams",
        seen.requests_in, seen.request_streams_in
    );
    pair.runtime.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn a_block_one_peer_lacks_is_asked_of_the_next_peer_and_never_again_of_that_one() {
    // The client downloads a file of 40 blocks from two peers: the first it asks has
    // none of them, the second has all. Every block the first lacked must be asked of
    // the second next, and the first must never be asked for a block twice (a retry
    // that followed the rotation could ask it three times and give the block up).
    let contents = numbered_blocks(40);
    let Pair {
        runtime,
        server_source: full_source,
        client,
        server_id: full_id,
        ..
    } = connected_pair(51, &contents);
    let empty_source = Arc::new(Blocks::new(HashMap::new()));
    let empty = start(&runtime, 60, empty_source.clone());
    let empty_id = DeviceKey::from_secret_bytes([60; 32]).device_id();
    let listening = wait_for(Duration::from_secs(10), || {
        !empty.listen_addresses().is_empty()
    });
    assert!(listening.is_some(), "the second server does not listen");
    client.dial(&empty_id, empty.listen_addresses());
    let up = wait_for(Duration::from_secs(30), || client.is_connected(&empty_id));
    assert!(
        up.is_some(),
        "client could not connect to the second server"
    );

    let manifest = manifest_of(&contents);
    *full_source.manifest.lock().unwrap() = Some(manifest.clone());
    let home = tempfile::tempdir().unwrap();
    let store = weft_node::store::Store::open(&home.path().join("store.redb"), [1; 8]).unwrap();
    // The peer without the blocks first: the first requests go to it.
    let fetched = download(
        &runtime,
        &client,
        store,
        &home.path().join("folder"),
        vec![empty_id, full_id],
        &manifest,
    );
    assert_eq!(std::fs::read(&fetched.temp).unwrap(), contents.concat());

    let lacked = empty_source.asked();
    assert!(
        !lacked.is_empty(),
        "the peer without the blocks was never asked"
    );
    let mut once = std::collections::HashSet::new();
    for hash in &lacked {
        assert!(
            once.insert(*hash),
            "the peer that lacks block {hash} was asked for it twice"
        );
    }
    let served = full_source.asked();
    for hash in &lacked {
        assert!(
            served.contains(hash),
            "block {hash} was not asked of the other peer"
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn blocks_in_a_local_file_are_copied_and_one_that_no_longer_verifies_is_fetched() {
    // The client's folder holds `old.bin` with the same 40 blocks as the file it
    // downloads, as its index says, except that block 5 changed on disk since it was
    // indexed. The download copies the other 39 from `old.bin` (read in runs of
    // neighbours) and asks the peer for block 5 alone.
    let contents = numbered_blocks(40);
    let Pair {
        runtime,
        server_source,
        client,
        server_id,
        ..
    } = connected_pair(71, &contents);
    let manifest = manifest_of(&contents);
    *server_source.manifest.lock().unwrap() = Some(manifest.clone());
    let home = tempfile::tempdir().unwrap();
    let root = home.path().join("folder");
    let mut on_disk = contents.clone();
    on_disk[5] = vec![b'x'; contents[5].len()];
    let store = indexed_local_file(home.path(), &on_disk, &manifest);
    let fetched = download(&runtime, &client, store, &root, vec![server_id], &manifest);
    assert_eq!(std::fs::read(&fetched.temp).unwrap(), contents.concat());
    assert_eq!(
        server_source.asked(),
        vec![BlockHash::of(&contents[5])],
        "only the block that changed locally should come from the peer"
    );
    assert_eq!(fetched.bytes_fetched, contents[5].len() as u64);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn a_large_edit_fetches_its_new_blocks_while_the_rest_is_copied_locally() {
    // A 48 MiB file (the size from which the local copy and the fetching of new blocks
    // overlap): its first block is new (no local file has it), block 100 changed on
    // disk since `old.bin` was indexed, the other 190 are in `old.bin`. The new block
    // is asked for at once, in a request of its own, while the copy runs; block 100
    // once the copy has found it changed, in a second request. Nothing else is asked.
    let count = 192usize;
    let mut contents: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&(i as u64).to_le_bytes());
            let mut block = vec![0u8; 256 * 1024];
            hasher.finalize_xof().fill(&mut block);
            block
        })
        .collect();
    let old_contents = contents.clone();
    contents[0] = vec![b'n'; 256 * 1024 + 10];
    assert!(
        contents.iter().map(Vec::len).sum::<usize>() as u64 >= weft_node::fetch::OVERLAP_MIN_SIZE
    );
    let Pair {
        runtime,
        server_source,
        client,
        server_id,
        ..
    } = connected_pair(81, &contents);
    let manifest = manifest_of(&contents);
    let old_manifest = manifest_of(&old_contents);
    *server_source.manifest.lock().unwrap() = Some(manifest.clone());
    let home = tempfile::tempdir().unwrap();
    let root = home.path().join("folder");
    let mut on_disk = old_contents.clone();
    on_disk[100] = vec![b'x'; old_contents[100].len()];
    let store = indexed_local_file(home.path(), &on_disk, &old_manifest);
    let fetched = download(&runtime, &client, store, &root, vec![server_id], &manifest);
    assert!(
        std::fs::read(&fetched.temp).unwrap() == contents.concat(),
        "the downloaded file differs from the version"
    );
    assert_eq!(
        *server_source.batches.lock().unwrap(),
        vec![
            vec![BlockHash::of(&contents[0])],
            vec![BlockHash::of(&contents[100])]
        ],
        "the new block is asked for alone while the local copy runs, the changed one after \
         it; nothing else comes from the peer"
    );
    assert_eq!(
        fetched.bytes_fetched,
        (contents[0].len() + contents[100].len()) as u64
    );
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// A store in `home` whose folder `shared` (at `home/folder`) holds `old.bin`, written
/// from `on_disk` and indexed as `manifest` (which it may no longer match).
fn indexed_local_file(
    home: &std::path::Path,
    on_disk: &[Vec<u8>],
    manifest: &Manifest,
) -> weft_node::store::Store {
    let root = home.join("folder");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("old.bin"), on_disk.concat()).unwrap();
    let store = weft_node::store::Store::open(&home.join("store.redb"), [1; 8]).unwrap();
    store
        .commit_scan_batch(
            &FolderId::new("shared").unwrap(),
            &[weft_node::store::LocalChange::Upsert {
                path: RelPath::new("old.bin").unwrap(),
                entry: weft_node::store::LocalEntry {
                    kind: EntryKind::File,
                    size: manifest.size(),
                    mtime_ns: 1,
                    mode: 0o644,
                    inode: 1,
                    manifest: Some(manifest.hash()),
                    symlink_target: None,
                },
                manifest: Some(manifest.clone()),
            }],
            b"",
        )
        .unwrap();
    store
}

/// The manifest of a file made of `contents`, one block each.
fn manifest_of(contents: &[Vec<u8>]) -> Manifest {
    Manifest::from_blocks(
        contents
            .iter()
            .map(|c| BlockRef {
                hash: BlockHash::of(c),
                len: c.len() as u32,
            })
            .collect(),
    )
    .unwrap()
}

/// Downloads `new.bin` with `manifest` into `root` (folder `shared`) through
/// `fetch_files`, from `peers` in that order; panics if it fails.
fn download(
    runtime: &tokio::runtime::Runtime,
    client: &NetHandle,
    store: weft_node::store::Store,
    root: &std::path::Path,
    peers: Vec<DeviceId>,
    manifest: &Manifest,
) -> weft_node::fetch::Fetched {
    std::fs::create_dir_all(root).unwrap();
    let entry = Entry {
        kind: EntryKind::File,
        deleted: false,
        size: manifest.size(),
        mtime_ns: 1_000_000_000,
        mode: 0o644,
        content: Content::for_manifest(manifest),
        author: peers[0],
    };
    let context = weft_node::fetch::FetchContext {
        net: client.clone(),
        store: Arc::new(store),
        folder: FolderId::new("shared").unwrap(),
        root: root.to_path_buf(),
        peers,
        versions: None,
    };
    let path = RelPath::new("new.bin").unwrap();
    let mut results = runtime.block_on(weft_node::fetch::fetch_files(context, vec![(path, entry)]));
    results.pop().unwrap().expect("the download failed")
}
