//! Block transfers: which peer is asked for which blocks, and what an answer means.
//!
//! A download (one large file, or a group of small ones that share requests) first
//! takes every block some local file already has (dedup, renames, copies: never
//! fetched); what is left goes to [`BlockRequests`], which decides the requests: the
//! missing blocks in file order, [`BATCH_BLOCKS`] per request, [`BATCHES_IN_FLIGHT`]
//! at once, the peers in turn. A block a peer lacks (or sent corrupt) is asked of the
//! next peer, up to [`BLOCK_ATTEMPTS`] times (or once per peer, if there are more); a
//! failed request (a stream refused or reset) says nothing about its blocks and is
//! sent again after a growing pause, until [`MAX_REQUEST_FAILURES`]. A manifest that is
//! not stored here is asked of each peer the same way ([`ManifestRequests`]).
//!
//! The executor moves the bytes: it sends the requests, verifies every block against
//! its hash and length, writes it, and reports each answer. The node's `fetch` and the
//! simulation both run this code.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use weft_protocol::path::TEMP_PREFIX;
use weft_protocol::{BlockHash, DeviceId, Manifest, RelPath};

/// Blocks per request: a few MiB per round trip with the default chunk size.
pub const BATCH_BLOCKS: usize = 8;
/// Requests in flight per download (~8 MiB with the default chunk size). 8 looked a
/// little faster for large files but doubles what a dropped connection loses
/// (docs/benchmarks.md).
pub const BATCHES_IN_FLIGHT: usize = 4;
/// Times a block is asked for (from different peers where possible) before giving up.
pub const BLOCK_ATTEMPTS: usize = 3;
/// Failed requests (not missing blocks) a download survives.
pub const MAX_REQUEST_FAILURES: usize = 50;
/// Pause before a failed request is sent again, times the failures so far (at most
/// 20 times).
pub const REQUEST_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The temp file of a download, as a path of the folder: beside its destination, and
/// named from the path and the manifest, so that a download interrupted by a crash
/// finds its own temp file again (resume).
pub fn temp_name(path: &RelPath, manifest: &Manifest) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(path.as_str().as_bytes());
    hasher.update(manifest.hash().as_bytes());
    let id = hasher.finalize().to_hex();
    match path.parent() {
        Some(parent) => format!("{parent}/{TEMP_PREFIX}{}", &id[..24]),
        None => format!("{TEMP_PREFIX}{}", &id[..24]),
    }
}

/// A request to send: these blocks, of this peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Who is asked.
    pub peer: DeviceId,
    /// The blocks asked for, in order.
    pub hashes: Vec<BlockHash>,
}

/// What became of one block of an answer, as the executor found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// It came and matched its hash and length (and was kept).
    Verified,
    /// It came and did not match: the peer is penalised and the block asked elsewhere.
    Corrupt,
    /// The peer does not have it.
    Missing,
}

/// What the executor does after an answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Blocks given up: no peer had them after every attempt. The files that need
    /// them fail; the others go on.
    pub lost: Vec<BlockHash>,
    /// The peer sent a corrupt block: count it against the peer.
    pub penalise: bool,
    /// Wait this long before the next request (the request failed).
    pub pause: Option<Duration>,
    /// Requests keep failing: every block still needed is given up.
    pub give_up: bool,
}

/// The requests of one download (a file, or a group of small files).
#[derive(Clone, Debug)]
pub struct BlockRequests {
    peers: Vec<DeviceId>,
    /// Batches to send, the next one last.
    queue: Vec<Vec<BlockHash>>,
    /// Requests sent so far that went round the peers.
    round: usize,
    /// A block one peer did not have is asked of the next peer, not of whichever peer
    /// the rotation gives (with two peers of which one lacks it, the rotation could ask
    /// the same one three times and give the block up).
    next_peer: BTreeMap<BlockHash, usize>,
    attempts: BTreeMap<BlockHash, usize>,
    request_failures: usize,
    in_flight: usize,
}

impl BlockRequests {
    /// Requests for `missing` (in the order they are wanted: file order, as the sender
    /// reads each file front to back) from `peers`.
    pub fn new(missing: &[BlockHash], peers: Vec<DeviceId>) -> Self {
        let mut queue: Vec<Vec<BlockHash>> =
            missing.chunks(BATCH_BLOCKS).map(<[_]>::to_vec).collect();
        queue.reverse();
        Self {
            peers,
            queue,
            round: 0,
            next_peer: BTreeMap::new(),
            attempts: BTreeMap::new(),
            request_failures: 0,
            in_flight: 0,
        }
    }

    /// The next request to send, if one may be sent now: at most
    /// [`BATCHES_IN_FLIGHT`] are out at once. `None` with no peers.
    pub fn next_request(&mut self) -> Option<Request> {
        if self.in_flight >= BATCHES_IN_FLIGHT || self.peers.is_empty() {
            return None;
        }
        let hashes = self.queue.pop()?;
        let index = match hashes.as_slice() {
            [hash] => self.next_peer.get(hash).copied(),
            _ => None,
        }
        .unwrap_or_else(|| {
            self.round += 1;
            self.round - 1
        });
        self.in_flight += 1;
        Some(Request {
            peer: self.peers[index % self.peers.len()],
            hashes,
        })
    }

    /// Whether nothing is queued or in flight.
    pub fn is_done(&self) -> bool {
        self.in_flight == 0 && self.queue.is_empty()
    }

    /// Whether blocks are still wanted but no peer can be asked.
    pub fn has_no_peers(&self) -> bool {
        self.peers.is_empty() && !self.queue.is_empty()
    }

    /// `request` was answered, block by block (`Some`), or failed as a whole (`None`:
    /// the stream was refused, reset, or timed out).
    pub fn answered(
        &mut self,
        request: Request,
        answer: Option<Vec<(BlockHash, Received)>>,
    ) -> Outcome {
        self.in_flight = self.in_flight.saturating_sub(1);
        let mut outcome = Outcome::default();
        let Some(blocks) = answer else {
            // A failed request says nothing about the blocks: ask again after a
            // growing pause, from the next peer, without counting it as their absence.
            self.request_failures += 1;
            if self.request_failures > MAX_REQUEST_FAILURES {
                outcome.give_up = true;
                self.queue.clear();
                return outcome;
            }
            let factor = u32::try_from(self.request_failures.min(20)).unwrap_or(20);
            outcome.pause = Some(REQUEST_RETRY_PAUSE * factor);
            self.queue.push(request.hashes);
            return outcome;
        };
        let after = self
            .peers
            .iter()
            .position(|device| *device == request.peer)
            .map_or(0, |index| index + 1);
        let answered: BTreeMap<BlockHash, Received> = blocks.into_iter().collect();
        for hash in request.hashes {
            match answered.get(&hash).copied().unwrap_or(Received::Missing) {
                Received::Verified => continue,
                Received::Corrupt => outcome.penalise = true,
                Received::Missing => {}
            }
            self.next_peer.insert(hash, after);
            let tries = self.attempts.entry(hash).or_insert(0);
            *tries += 1;
            if *tries >= BLOCK_ATTEMPTS.max(self.peers.len()) {
                outcome.lost.push(hash);
                continue;
            }
            self.queue.push(vec![hash]);
        }
        outcome
    }
}

/// The requests for one manifest that is not stored here: each peer in turn; a failed
/// request is sent again after a growing pause, a peer that does not have it is not
/// asked again.
#[derive(Clone, Debug)]
pub struct ManifestRequests {
    peers: VecDeque<DeviceId>,
    failures: usize,
}

impl ManifestRequests {
    /// Requests to `peers`.
    pub fn new(peers: &[DeviceId]) -> Self {
        Self {
            peers: peers.iter().copied().collect(),
            failures: 0,
        }
    }

    /// The peer to ask next; `None` once every peer said it does not have it, or
    /// requests failed [`MAX_REQUEST_FAILURES`] times.
    pub fn next_peer(&mut self) -> Option<DeviceId> {
        self.peers.pop_front()
    }

    /// `peer` was asked: it answered (`Some(has_it)`) or the request failed (`None`).
    /// Returns how long to wait before the next request.
    pub fn answered(&mut self, peer: DeviceId, answer: Option<bool>) -> Option<Duration> {
        match answer {
            Some(_) => None,
            None => {
                self.failures += 1;
                if self.failures > MAX_REQUEST_FAILURES {
                    return None;
                }
                self.peers.push_back(peer);
                let factor = u32::try_from(self.failures.min(20)).unwrap_or(20);
                Some(REQUEST_RETRY_PAUSE * factor)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_protocol::DeviceKey;

    fn device(seed: u8) -> DeviceId {
        DeviceKey::from_secret_bytes([seed; 32]).device_id()
    }

    fn hashes(n: u8) -> Vec<BlockHash> {
        (0..n).map(|i| BlockHash::of(&[i])).collect()
    }

    #[test]
    fn batches_go_to_the_peers_in_turn_with_a_bound_in_flight() {
        let (a, b) = (device(1), device(2));
        let wanted = hashes(40);
        let mut requests = BlockRequests::new(&wanted, vec![a, b]);
        let sent: Vec<Request> = std::iter::from_fn(|| requests.next_request()).collect();
        assert_eq!(sent.len(), BATCHES_IN_FLIGHT);
        assert_eq!(sent[0].hashes, wanted[..BATCH_BLOCKS].to_vec());
        assert_eq!(
            sent[1].hashes,
            wanted[BATCH_BLOCKS..2 * BATCH_BLOCKS].to_vec()
        );
        assert_eq!(
            sent.iter().map(|r| r.peer).collect::<Vec<_>>(),
            vec![a, b, a, b]
        );
        let all: Vec<(BlockHash, Received)> = sent[0]
            .hashes
            .iter()
            .map(|h| (*h, Received::Verified))
            .collect();
        let outcome = requests.answered(sent[0].clone(), Some(all));
        assert_eq!(outcome, Outcome::default());
        assert!(requests.next_request().is_some(), "a slot was freed");
    }

    #[test]
    fn a_missing_block_is_asked_of_the_next_peer_then_given_up() {
        let (a, b) = (device(1), device(2));
        let wanted = hashes(1);
        let mut requests = BlockRequests::new(&wanted, vec![a, b]);
        let mut asked = Vec::new();
        let mut lost = Vec::new();
        while let Some(request) = requests.next_request() {
            asked.push(request.peer);
            let answer = vec![(wanted[0], Received::Missing)];
            lost.extend(requests.answered(request, Some(answer)).lost);
        }
        assert_eq!(asked, vec![a, b, a], "each try goes to the next peer");
        assert_eq!(lost, wanted);
        assert!(requests.is_done());
    }

    #[test]
    fn a_corrupt_block_penalises_its_sender_and_is_asked_elsewhere() {
        let (a, b) = (device(1), device(2));
        let wanted = hashes(2);
        let mut requests = BlockRequests::new(&wanted, vec![a, b]);
        let request = requests.next_request().unwrap();
        let answer = vec![
            (wanted[0], Received::Verified),
            (wanted[1], Received::Corrupt),
        ];
        let outcome = requests.answered(request, Some(answer));
        assert!(outcome.penalise);
        let again = requests.next_request().unwrap();
        assert_eq!((again.peer, again.hashes), (b, vec![wanted[1]]));
    }

    #[test]
    fn failed_requests_pause_longer_each_time_then_give_up() {
        let wanted = hashes(3);
        let mut requests = BlockRequests::new(&wanted, vec![device(1)]);
        let mut pauses = Vec::new();
        loop {
            let request = requests.next_request().unwrap();
            let outcome = requests.answered(request, None);
            if outcome.give_up {
                break;
            }
            pauses.push(outcome.pause.unwrap());
        }
        assert_eq!(pauses.len(), MAX_REQUEST_FAILURES);
        assert_eq!(pauses[0], REQUEST_RETRY_PAUSE);
        assert_eq!(pauses[1], REQUEST_RETRY_PAUSE * 2);
        assert_eq!(*pauses.last().unwrap(), REQUEST_RETRY_PAUSE * 20);
        assert!(requests.is_done());
    }

    #[test]
    fn a_manifest_is_asked_of_every_peer_and_again_after_failures() {
        let (a, b) = (device(1), device(2));
        let mut requests = ManifestRequests::new(&[a, b]);
        assert_eq!(requests.next_peer(), Some(a));
        assert!(requests.answered(a, None).is_some());
        assert_eq!(requests.next_peer(), Some(b));
        assert_eq!(requests.answered(b, Some(false)), None);
        assert_eq!(
            requests.next_peer(),
            Some(a),
            "a failed request is sent again"
        );
        assert_eq!(requests.answered(a, Some(false)), None);
        assert_eq!(requests.next_peer(), None);
    }

    #[test]
    fn temp_names_sit_beside_their_file_and_differ_by_version() {
        let path = RelPath::new("a/b.txt").unwrap();
        let one = Manifest::empty();
        let name = temp_name(&path, &one);
        assert!(name.starts_with(&format!("a/{TEMP_PREFIX}")), "{name}");
        assert_eq!(name, temp_name(&path, &one));
        assert_ne!(name, temp_name(&RelPath::new("b.txt").unwrap(), &one));
    }
}
