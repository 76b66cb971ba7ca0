//! Block requests between two real network stacks in one process (real libp2p over
//! TCP on 127.0.0.1): many requests made at once share streams, every caller gets
//! exactly its own blocks back, and requests one after the other reuse one stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weft_node::net::{self, BlockSource, NetConfig, NetHandle};
use weft_protocol::{BlockHash, DeviceId, DeviceKey, FolderId, Manifest, ManifestHash};
use weft_tests::wait_for;

/// Serves blocks from memory and counts requests (one authorisation per request).
struct Blocks {
    blocks: HashMap<BlockHash, Vec<u8>>,
    requests: AtomicUsize,
}

impl BlockSource for Blocks {
    fn authorised(&self, _: &DeviceId, _: &FolderId) -> bool {
        self.requests.fetch_add(1, Ordering::SeqCst);
        true
    }
    fn block(&self, _: &FolderId, hash: &BlockHash) -> Option<Vec<u8>> {
        self.blocks.get(hash).cloned()
    }
    fn manifest(&self, _: &FolderId, _: &ManifestHash) -> Option<Manifest> {
        None
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
    let server_source = Arc::new(Blocks {
        blocks: contents
            .iter()
            .map(|c| (BlockHash::of(c), c.clone()))
            .collect(),
        requests: AtomicUsize::new(0),
    });
    let server = start(&runtime, seed, server_source.clone());
    let client = start(
        &runtime,
        seed + 1,
        Arc::new(Blocks {
            blocks: HashMap::new(),
            requests: AtomicUsize::new(0),
        }),
    );
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
