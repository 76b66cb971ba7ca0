//! Block transfers in the simulation: what the node's `fetch` does, over the virtual
//! disk and network.
//!
//! The decisions are the folder core's (`weft_core::transfer`): which peer is asked for
//! which blocks, how many requests are out at once, what a missing or corrupt block or
//! a failed request means, when to give up; and the temp file's name. This module is
//! their executor: it sends requests as messages, verifies every block against its
//! hash and length, writes it into a temp file whose verified blocks are committed to
//! the store (so that a restart resumes them), takes blocks local files already have
//! first, and reports each task (a group of files) to the core when all its files
//! are done.

use std::collections::BTreeMap;

use weft_core::folder::Fetched;
use weft_core::io::DownloadRequest;
use weft_core::transfer::{BlockRequests, ManifestRequests, Outcome, Received, Request, temp_name};
use weft_protocol::document::{Content, Entry};
use weft_protocol::{BlockHash, DeviceId, Manifest, RelPath};

use crate::disk::{DiskError, parent};
use crate::executor::{BLOCK, SimIo, SimTemp};
use crate::message::Msg;

/// The results of one task, by download ID, as the core takes them.
pub type TaskResults = Vec<(u64, Result<Fetched<SimTemp>, String>)>;

/// Every transfer of a device (lost in a crash).
#[derive(Debug, Default)]
pub struct Transfers {
    tasks: BTreeMap<u64, Task>,
    /// Requests waiting for an answer, by request ID: the task and what was asked.
    pending: BTreeMap<u64, (u64, Pending)>,
    /// Finished tasks, to report to the core.
    pub completed: Vec<TaskResults>,
    next_task: u64,
    next_request: u64,
}

impl Transfers {
    /// Whether nothing is being transferred.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty() && self.completed.is_empty()
    }
}

#[derive(Debug)]
enum Pending {
    Manifest { peer: DeviceId },
    Blocks(Request),
}

/// One download task: a group of files that share requests.
#[derive(Debug)]
struct Task {
    files: Vec<File>,
    peers: Vec<DeviceId>,
    /// The file whose manifest is being asked for, and of whom.
    manifest: Option<(usize, ManifestRequests)>,
    blocks: Option<BlockRequests>,
    /// Where each missing block goes.
    targets: Targets,
}

#[derive(Debug)]
struct File {
    id: u64,
    path: RelPath,
    entry: Entry,
    manifest: Option<Manifest>,
    temp: Option<String>,
    error: Option<String>,
}

impl SimIo {
    fn request_id(&mut self) -> u64 {
        self.transfers.next_request += 1;
        self.transfers.next_request
    }

    /// Starts a download task (the core's [`weft_core::io::Peers::start_download`]).
    pub(crate) fn start_task(&mut self, group: Vec<DownloadRequest>, peers: Vec<DeviceId>) {
        self.transfers.next_task += 1;
        let id = self.transfers.next_task;
        let files = group
            .into_iter()
            .map(|request| File {
                id: request.id,
                manifest: match &request.entry.content {
                    Content::Inline(manifest) => Some(manifest.clone()),
                    Content::Manifest(hash) => self.store.manifests.get(hash).cloned(),
                    _ => None,
                },
                path: request.path,
                entry: request.entry,
                temp: None,
                error: None,
            })
            .collect();
        self.transfers.tasks.insert(
            id,
            Task {
                files,
                peers,
                manifest: None,
                blocks: None,
                targets: BTreeMap::new(),
            },
        );
        self.advance(id);
    }

    /// Moves a task on: manifests first (one file at a time, as the node asks), then
    /// temp files and local copies, then block requests, then the report.
    fn advance(&mut self, task_id: u64) {
        if self.crashed {
            return;
        }
        let Some(mut task) = self.transfers.tasks.remove(&task_id) else {
            return;
        };
        if task.blocks.is_none() && !self.ask_manifests(task_id, &mut task) {
            self.transfers.tasks.insert(task_id, task);
            return;
        }
        if task.blocks.is_none() {
            self.prepare(&mut task);
        }
        self.send_block_requests(task_id, &mut task);
        let done = task.blocks.as_ref().is_none_or(BlockRequests::is_done);
        if done {
            self.report(task);
        } else {
            self.transfers.tasks.insert(task_id, task);
        }
    }

    /// Asks for the next missing manifest; true once every file has one (or failed).
    fn ask_manifests(&mut self, task_id: u64, task: &mut Task) -> bool {
        loop {
            let (index, requests) = match &mut task.manifest {
                Some((index, requests)) => (*index, requests),
                None => {
                    let Some(index) = task
                        .files
                        .iter()
                        .position(|f| f.manifest.is_none() && f.error.is_none())
                    else {
                        return true;
                    };
                    task.manifest = Some((index, ManifestRequests::new(&task.peers)));
                    continue;
                }
            };
            if self
                .transfers
                .pending
                .values()
                .any(|(t, p)| *t == task_id && matches!(p, Pending::Manifest { .. }))
            {
                return false;
            }
            let file = &mut task.files[index];
            let Content::Manifest(hash) = file.entry.content else {
                file.error = Some("entry has no file content".into());
                task.manifest = None;
                continue;
            };
            let Some(peer) = requests.next_peer() else {
                file.error = Some(format!("no connected device has manifest {hash}"));
                task.manifest = None;
                continue;
            };
            if !self.connected.contains(&peer) {
                // The node's stream to a device that is gone fails at once.
                let _ = requests.answered(peer, None);
                continue;
            }
            let id = self.request_id();
            self.outbox.push((peer, Msg::ManifestRequest { id, hash }));
            self.transfers
                .pending
                .insert(id, (task_id, Pending::Manifest { peer }));
            return false;
        }
    }

    /// Temp files (resumed where their verified blocks still match), local copies of
    /// every block a local file has, and the block requests for the rest.
    fn prepare(&mut self, task: &mut Task) {
        let mut order = Vec::new();
        for index in 0..task.files.len() {
            let (path, manifest) = match &task.files[index] {
                File {
                    manifest: Some(manifest),
                    error: None,
                    path,
                    ..
                } => (path.clone(), manifest.clone()),
                _ => continue,
            };
            let (temp, mut have) = match self.prepare_temp(&path, &manifest) {
                Ok(prepared) => prepared,
                Err(error) => {
                    task.files[index].error = Some(format!("temp file: {error:?}"));
                    continue;
                }
            };
            let mut wrote = Vec::new();
            for (block, (offset, entry)) in manifest.blocks_with_offsets().enumerate() {
                if have[block] {
                    continue;
                }
                if let Some(bytes) = self.find_block(&entry.hash) {
                    let roll = self.roll();
                    if let Err(error) = self.disk.write_at(&temp, offset as usize, &bytes, roll) {
                        task.files[index].error = Some(format!("writing the temp file: {error:?}"));
                        break;
                    }
                    have[block] = true;
                    wrote.push(block);
                }
            }
            self.record_progress(&temp, &wrote);
            task.files[index].temp = Some(temp);
            if task.files[index].error.is_some() {
                continue;
            }
            for (block, (offset, entry)) in manifest.blocks_with_offsets().enumerate() {
                if have[block] {
                    continue;
                }
                let places = task.targets.entry(entry.hash).or_default();
                if places.is_empty() {
                    order.push(entry.hash);
                }
                places.push((index, offset as usize));
            }
        }
        task.blocks = Some(BlockRequests::new(&order, task.peers.clone()));
    }

    fn send_block_requests(&mut self, task_id: u64, task: &mut Task) {
        let Some(blocks) = &mut task.blocks else {
            return;
        };
        if blocks.has_no_peers() {
            let why = "no connected device to fetch blocks from";
            fail_waiting(&mut task.files, &mut task.targets, why);
            task.blocks = Some(BlockRequests::new(&[], Vec::new()));
            return;
        }
        while let Some(request) = blocks.next_request() {
            if !self.connected.contains(&request.peer) {
                // The node's stream to a device that is gone fails at once.
                let outcome = blocks.answered(request, None);
                apply_outcome(&mut task.files, &mut task.targets, &outcome);
                continue;
            }
            self.transfers.next_request += 1;
            let id = self.transfers.next_request;
            self.outbox.push((
                request.peer,
                Msg::BlockRequest {
                    id,
                    hashes: request.hashes.clone(),
                },
            ));
            self.transfers
                .pending
                .insert(id, (task_id, Pending::Blocks(request)));
        }
    }

    /// Reports a finished task to the core.
    fn report(&mut self, task: Task) {
        let results = task
            .files
            .into_iter()
            .map(|file| {
                let result = match (file.error, file.manifest, file.temp) {
                    (Some(error), _, _) => Err(error),
                    (None, Some(manifest), Some(temp)) => Ok(Fetched {
                        temp: SimTemp(temp),
                        manifest,
                    }),
                    _ => Err("the download did not run".to_owned()),
                };
                if let Err(why) = &result {
                    self.note(format!("download of {} failed: {why}", file.path));
                }
                (file.id, result)
            })
            .collect();
        self.transfers.completed.push(results);
    }

    /// A manifest answer.
    pub(crate) fn on_manifest(&mut self, from: DeviceId, id: u64, manifest: Option<Manifest>) {
        let Some((task_id, Pending::Manifest { peer })) = self.take_pending(from, id) else {
            return;
        };
        if let Some(task) = self.transfers.tasks.get_mut(&task_id)
            && let Some((index, requests)) = &mut task.manifest
        {
            let file = &mut task.files[*index];
            let wanted = file.entry.content.manifest_hash();
            match manifest {
                Some(manifest) if Some(manifest.hash()) == wanted => {
                    file.manifest = Some(manifest);
                    task.manifest = None;
                }
                Some(_) => {
                    *self.bad_blocks.entry(from).or_default() += 1;
                    requests.answered(peer, Some(false));
                }
                None => {
                    requests.answered(peer, Some(false));
                }
            }
        }
        self.advance(task_id);
    }

    /// A block answer: every block verified, written where it goes, and reported to the
    /// core's requests.
    pub(crate) fn on_blocks(
        &mut self,
        from: DeviceId,
        id: u64,
        blocks: Vec<(BlockHash, Option<Vec<u8>>)>,
    ) {
        let Some((task_id, Pending::Blocks(request))) = self.take_pending(from, id) else {
            return;
        };
        let Some(mut task) = self.transfers.tasks.remove(&task_id) else {
            return;
        };
        let mut received = Vec::with_capacity(blocks.len());
        for (hash, data) in blocks {
            let Some(data) = data else {
                received.push((hash, Received::Missing));
                continue;
            };
            let length_ok = task.targets.get(&hash).is_some_and(|places| {
                places.iter().all(|(index, _)| {
                    task.files[*index].manifest.as_ref().is_some_and(|m| {
                        m.blocks()
                            .iter()
                            .any(|b| b.hash == hash && b.len as usize == data.len())
                    })
                })
            });
            if BlockHash::of(&data) != hash || (!length_ok && task.targets.contains_key(&hash)) {
                received.push((hash, Received::Corrupt));
                continue;
            }
            received.push((hash, Received::Verified));
            for (index, offset) in task.targets.remove(&hash).unwrap_or_default() {
                let Some(temp) = task.files[index].temp.clone() else {
                    continue;
                };
                let roll = self.roll();
                if let Err(error) = self.disk.write_at(&temp, offset, &data, roll) {
                    task.files[index].error = Some(format!("writing the temp file: {error:?}"));
                    continue;
                }
                if let Some(block) = offset_index(&task.files[index], offset) {
                    self.record_progress(&temp, &[block]);
                }
            }
        }
        let outcome = match &mut task.blocks {
            Some(requests) => requests.answered(request, Some(received)),
            None => Default::default(),
        };
        if outcome.penalise {
            *self.bad_blocks.entry(from).or_default() += 1;
            self.note(format!("bad block from {}; asking elsewhere", from.short()));
        }
        apply_outcome(&mut task.files, &mut task.targets, &outcome);
        self.transfers.tasks.insert(task_id, task);
        self.advance(task_id);
    }

    /// A request got no answer in time (or its connection went down).
    pub(crate) fn request_failed(&mut self, id: u64) {
        let Some((task_id, pending)) = self.transfers.pending.remove(&id) else {
            return;
        };
        let Some(mut task) = self.transfers.tasks.remove(&task_id) else {
            return;
        };
        match pending {
            Pending::Manifest { peer } => {
                if let Some((_, requests)) = &mut task.manifest {
                    // The pause is the node's; here the next request goes at once.
                    let _ = requests.answered(peer, None);
                }
            }
            Pending::Blocks(request) => {
                let outcome = match &mut task.blocks {
                    Some(requests) => requests.answered(request, None),
                    None => Default::default(),
                };
                apply_outcome(&mut task.files, &mut task.targets, &outcome);
            }
        }
        self.transfers.tasks.insert(task_id, task);
        self.advance(task_id);
    }

    /// Every request waiting for `peer` fails (its connection went down).
    pub(crate) fn peer_gone(&mut self, peer: DeviceId) {
        let waiting: Vec<u64> = self
            .transfers
            .pending
            .iter()
            .filter(|(_, (_, pending))| match pending {
                Pending::Manifest { peer: p } => *p == peer,
                Pending::Blocks(request) => request.peer == peer,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.request_failed(id);
        }
    }

    /// The pending request `id`, if `from` is the device it was sent to (late and
    /// duplicate answers are dropped).
    fn take_pending(&mut self, from: DeviceId, id: u64) -> Option<(u64, Pending)> {
        let (_, pending) = self.transfers.pending.get(&id)?;
        let to = match pending {
            Pending::Manifest { peer } => *peer,
            Pending::Blocks(request) => request.peer,
        };
        if to != from {
            return None;
        }
        self.transfers.pending.remove(&id)
    }

    fn record_progress(&mut self, temp: &str, blocks: &[usize]) {
        if blocks.is_empty() || self.disk.full {
            return;
        }
        self.store
            .progress
            .entry(temp.to_owned())
            .or_default()
            .extend(blocks.iter().copied());
    }

    /// The temp file for a version, and which of its blocks are already in it
    /// (recorded as verified and still matching: a restarted node resumes them).
    fn prepare_temp(
        &mut self,
        path: &RelPath,
        manifest: &Manifest,
    ) -> Result<(String, Vec<bool>), DiskError> {
        let temp = temp_name(path, manifest);
        // A parent that became a symlink (or file) since the download was planned would
        // put the temp file outside the folder.
        if self.non_directory_parent_of(path).is_some() {
            return Err(DiskError::NotADirectory);
        }
        if let Some(dir) = parent(path.as_str()) {
            let roll = self.roll();
            self.disk.create_dir_all(dir, roll, true)?;
        }
        let mut have = vec![false; manifest.blocks().len()];
        match self.disk.read(&temp) {
            Some(data) if data.len() as u64 == manifest.size() => {
                let verified = self.store.progress.get(&temp).cloned().unwrap_or_default();
                for (index, (offset, block)) in manifest.blocks_with_offsets().enumerate() {
                    let offset = offset as usize;
                    let bytes = &data[offset..offset + block.len as usize];
                    if verified.contains(&index) && BlockHash::of(bytes) == block.hash {
                        have[index] = true;
                    }
                }
                let resumed = have.iter().filter(|h| **h).count();
                if resumed > 0 {
                    self.note(format!("resumed {path} with {resumed} verified blocks"));
                }
            }
            _ => {
                let roll = self.roll();
                let _ = self.disk.remove_file(&temp, 100, true);
                self.disk.write_file(
                    &temp,
                    vec![0; manifest.size() as usize],
                    0o600,
                    self.now,
                    roll,
                    true,
                )?;
                self.store.progress.remove(&temp);
            }
        }
        Ok((temp, have))
    }

    /// A block from any local file (checked against its hash) or the version store.
    pub fn find_block(&self, hash: &BlockHash) -> Option<Vec<u8>> {
        for (path, local) in &self.store.local {
            let Some(manifest) = local.manifest.and_then(|m| self.store.manifests.get(&m)) else {
                continue;
            };
            for (offset, block) in manifest.blocks_with_offsets() {
                if block.hash != *hash {
                    continue;
                }
                let data = self.disk.read(path.as_str())?;
                let (start, end) = (offset as usize, offset as usize + block.len as usize);
                if let Some(bytes) = data.get(start..end)
                    && BlockHash::of(bytes) == *hash
                {
                    return Some(bytes.to_vec());
                }
            }
        }
        for data in self.store.versions.values() {
            for chunk in data.chunks(BLOCK) {
                if BlockHash::of(chunk) == *hash {
                    return Some(chunk.to_vec());
                }
            }
        }
        None
    }
}

/// The index of the block at `offset` in a file's manifest.
fn offset_index(file: &File, offset: usize) -> Option<usize> {
    file.manifest.as_ref().and_then(|manifest| {
        manifest
            .blocks_with_offsets()
            .position(|(at, _)| at as usize == offset)
    })
}

/// Where each missing block goes: (file, offset).
type Targets = BTreeMap<BlockHash, Vec<(usize, usize)>>;

/// Fails the files that need a block the core's requests gave up, or every file still
/// waiting when they give up altogether.
fn apply_outcome(files: &mut [File], targets: &mut Targets, outcome: &Outcome) {
    for hash in &outcome.lost {
        for (index, _) in targets.remove(hash).unwrap_or_default() {
            files[index].error.get_or_insert_with(|| {
                format!("block {hash} is not available from any connected device")
            });
        }
    }
    if outcome.give_up {
        fail_waiting(files, targets, "block requests keep failing");
    }
}

/// Fails every file that still waits for a block.
fn fail_waiting(files: &mut [File], targets: &mut Targets, why: &str) {
    for (index, _) in std::mem::take(targets).into_values().flatten() {
        files[index].error.get_or_insert_with(|| why.to_owned());
    }
}
