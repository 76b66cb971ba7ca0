//! Chunking and hashing throughput over one 256 MiB pseudo-random buffer:
//! raw FastCDC (cut points only), raw BLAKE3 (one pass over the buffer, as 1 MiB
//! pieces), Weft's chunk + hash pipeline (`build_manifest`), and the re-hash of a new
//! version after a 10-byte insert at the front (`build_manifest_like`).
//!
//! Run: `cargo bench -p weft-protocol --bench chunking`. The target is
//! (chunk + hash) / (raw FastCDC) >= 0.9: hashing hidden behind chunking.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use weft_protocol::chunk::{build_manifest, build_manifest_like};
use weft_protocol::{ChunkParams, Chunker};

const LEN: usize = 256 * 1024 * 1024;

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out
}

fn bench(c: &mut Criterion) {
    let data = pseudo_random(LEN);
    let params = ChunkParams::DEFAULT;
    let mut group = c.benchmark_group("256MiB");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(LEN as u64));
    group.bench_function("fastcdc", |b| {
        b.iter(|| {
            let mut chunker = Chunker::new(&data[..], params);
            let mut chunks = 0usize;
            while let Some(chunk) = chunker.next_chunk().expect("in-memory read") {
                chunks += chunk.len() & 1;
            }
            chunks
        })
    });
    group.bench_function("blake3", |b| {
        b.iter(|| {
            data.chunks(1024 * 1024)
                .map(|piece| blake3::hash(piece).as_bytes()[0] as usize)
                .sum::<usize>()
        })
    });
    group.bench_function("chunk+hash", |b| {
        b.iter(|| {
            build_manifest(&data[..], &params, |_| {})
                .expect("in-memory read")
                .blocks()
                .len()
        })
    });
    let previous = build_manifest(&data[..], &params, |_| {}).expect("in-memory read");
    let mut inserted = b"ten bytes!".to_vec();
    inserted.extend_from_slice(&data);
    group.bench_function("chunk+hash like previous, after an insert", |b| {
        b.iter(|| {
            build_manifest_like(&inserted[..], &params, &previous, |_| {})
                .expect("in-memory read")
                .blocks()
                .len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
