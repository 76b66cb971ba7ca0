//! Measures the folder document at scale: insert, save, load and memory for N entries
//! of the real schema, and one path rewritten many times.
//!
//! Run: `cargo run --release -p weft-protocol --example document_scale -- 100000`
//! (and `-- 1000000`, `-- rewrite 10000`). Each run is one process, so peak RSS
//! (VmHWM) belongs to that measurement alone.

use std::time::Instant;

use weft_protocol::document::{self, Content, Entry, EntryKind, FolderDocument};
use weft_protocol::{BlockHash, BlockRef, DeviceKey, Manifest, RelPath};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn entry(author: weft_protocol::DeviceId, index: u64) -> Entry {
    // A small file: one block, inline manifest (the common case in big folders).
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&index.to_le_bytes());
    let hash = *blake3::hash(&hash).as_bytes();
    let size = 1000 + index % 50_000;
    let manifest = Manifest::from_blocks(vec![BlockRef {
        hash: BlockHash(hash),
        len: size as u32,
    }])
    .expect("valid manifest");
    Entry {
        kind: EntryKind::File,
        deleted: false,
        size,
        mtime_ns: 1_764_000_000_000_000_000 + index as i64,
        mode: 0o644,
        content: Content::Inline(manifest),
        author,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let author = DeviceKey::from_secret_bytes([3; 32]).device_id();
    let actor = document::actor_id(&author, [1; 8]);
    if args.first().map(String::as_str) == Some("rewrite") {
        let count: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
        let mut doc = FolderDocument::new(actor.clone());
        let path = RelPath::new("notes/today.md").expect("path");
        let start = Instant::now();
        for index in 0..count {
            doc.put(&path, &entry(author, index)).expect("put");
            doc.commit(index as i64, "edit");
        }
        let write = start.elapsed();
        let start = Instant::now();
        let saved = doc.save();
        let save = start.elapsed();
        let start = Instant::now();
        let mut loaded = FolderDocument::load(&saved, [], actor).expect("load");
        let load = start.elapsed();
        let start = Instant::now();
        let versions = loaded.history()["notes/today.md"].len();
        let history = start.elapsed();
        println!(
            "rewrite x{count}: writes+commits {:.2} s, save {:.3} s ({:.1} MB), load {:.3} s, history ({versions} versions) {:.3} s, peak RSS {:.0} MiB",
            write.as_secs_f64(),
            save.as_secs_f64(),
            saved.len() as f64 / 1e6,
            load.as_secs_f64(),
            history.as_secs_f64(),
            peak_rss_mib()
        );
        return;
    }
    let count: u64 = args.first().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let mut doc = FolderDocument::new(actor.clone());
    let start = Instant::now();
    // As the scanner does it: one commit per batch of 2,000 changes.
    for index in 0..count {
        let path = RelPath::new(&format!(
            "dir{:04}/sub{:02}/file{index}.txt",
            index / 1000,
            index % 37
        ))
        .expect("path");
        doc.put(&path, &entry(author, index)).expect("put");
        if index % 2000 == 1999 {
            doc.commit(index as i64, "scan");
        }
    }
    doc.commit(0, "scan");
    let insert = start.elapsed();
    let rss_after_insert = peak_rss_mib();
    let start = Instant::now();
    let saved = doc.save();
    let save = start.elapsed();
    drop(doc);
    let start = Instant::now();
    let loaded = FolderDocument::load(&saved, [], actor).expect("load");
    let load = start.elapsed();
    let start = Instant::now();
    let entries = loaded.entries().filter(|e| e.is_ok()).count();
    let iterate = start.elapsed();
    assert_eq!(entries as u64, count);
    println!(
        "{count} entries: insert {:.2} s (peak RSS {:.0} MiB), save {:.2} s ({:.1} MB), load {:.2} s, iterate+decode {:.2} s, peak RSS {:.0} MiB",
        insert.as_secs_f64(),
        rss_after_insert,
        save.as_secs_f64(),
        saved.len() as f64 / 1e6,
        load.as_secs_f64(),
        iterate.as_secs_f64(),
        peak_rss_mib()
    );
}
