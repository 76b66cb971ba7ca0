//! The world: devices, users, a network and faults on virtual time, from one seed.
//!
//! Every random choice comes from one [`Rng`] seeded with the run's seed, events are
//! processed in (time, sequence) order, and nothing reads a clock or iterates a hash
//! map: a seed replays the same history exactly. A run has three phases:
//! 1. **active** (`steps` events): users edit, the network delays, reorders,
//!    duplicates, loses and partitions, devices crash and restart, disks fail writes
//!    or fill up;
//! 2. **heal**: faults stop, crashed devices restart, partitions heal, disks free up;
//! 3. **settle**: events run until every device is idle and the network is empty,
//!    then every device rescans once more; the run must go quiet within a bound.
//!
//! The invariants (see [`crate::check`]) are checked after every event where they
//! apply, and convergence and "nothing lost" at the end.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use weft_protocol::access::Role;
use weft_protocol::change_signature::SignedChange;
use weft_protocol::document::{Content, Entry, EntryKind, FolderDocument, SyncState};
use weft_protocol::{DeviceId, DeviceKey, ManifestHash, RelPath};

use crate::check::{self, Violation};
use crate::device::Device;
use crate::disk::Node;
use crate::executor::{Sabotage, manifest_of};
use crate::message::Msg;
use crate::rng::Rng;

/// 2026-11-27 09:03:04 UTC: the simulated clock's start.
const EPOCH_NS: i64 = 1_795_770_184 * 1_000_000_000;
const MS: i64 = 1_000_000;
/// Delay from a user's change to the scan of its paths: the model's changes are complete
/// when made (whole files written, renames, deletes), which the node rescans after
/// [`weft_node::dirty::SETTLED_QUIET`] (a file still being written would wait for the
/// 200 ms debounce instead).
const SCAN_DELAY: i64 = weft_node::dirty::SETTLED_QUIET.as_millis() as i64 * MS;
/// Full rescan interval (the node's is an hour; shorter here to exercise it).
const FULL_SCAN: i64 = 30_000 * MS;
/// Failed downloads are retried this often (the node's RETRY_INTERVAL).
const RETRY: i64 = 5_000 * MS;
/// A request without an answer fails after this long.
const REQUEST_TIMEOUT: i64 = 2_000 * MS;
/// How long the settle phase may take before the run counts as not terminating.
const SETTLE_LIMIT: i64 = 600_000 * MS;

/// Names users pick from: few, so that devices collide on the same paths.
const NAMES: [&str; 6] = ["a.txt", "b.txt", "c.md", "d", "e.bin", "notes"];
const DIRS: [&str; 3] = ["x", "y", "z"];

/// What a run does.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of devices sharing the folder.
    pub devices: usize,
    /// Events in the active phase.
    pub steps: u64,
    /// Inject faults (network, crashes, disks).
    pub faults: bool,
    /// Keep the whole trace (replay), not just its tail.
    pub keep_trace: bool,
    /// A bug planted in every device's shell (tests of the checker).
    pub sabotage: Sabotage,
    /// Every disk keeps mtimes in even seconds, like FAT ([`crate::disk`]), and half
    /// of the users' rewrites keep the file's size: the racily clean files the scanner
    /// must hash again.
    pub coarse_timestamps: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            devices: 4,
            steps: 1500,
            faults: true,
            keep_trace: false,
            sabotage: Sabotage::None,
            coarse_timestamps: false,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Devices in the run.
    pub devices: usize,
    /// Events processed in all phases.
    pub events: u64,
    /// BLAKE3 of the whole trace: equal for equal histories.
    pub trace_hash: [u8; 32],
    /// The trace (all of it with `keep_trace`, else its last lines).
    pub trace: Vec<String>,
    /// The first invariant that failed.
    pub violation: Option<Violation>,
    /// Counts of what happened, for the summary.
    pub stats: Stats,
}

/// Counts of what happened in a run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// User operations carried out.
    pub user_ops: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages lost or dropped by a cut link.
    pub lost: u64,
    /// Crashes (including crash points).
    pub crashes: u64,
    /// Conflict copies at the end (on device 0).
    pub conflict_copies: u64,
    /// Files at the end (on device 0).
    pub files: u64,
}

#[derive(Clone, Debug)]
enum Event {
    User(usize),
    ScanDirty(usize),
    /// Racily clean files are due to be hashed again.
    Recheck(usize),
    FullScan(usize),
    Retry(usize),
    Deliver {
        from: usize,
        to: usize,
        epoch: u64,
        msg: Msg,
    },
    Timeout {
        device: usize,
        id: u64,
    },
    Crash(usize),
    Restart(usize),
    Partition,
    Heal,
    DiskFull(usize),
    DiskFreed(usize),
    Intruder,
    /// The view-only device, modified, publishes an edit.
    Vandal,
    /// Device 0 (the founder) removes a device from the access list.
    Revoke,
    /// The removed device, modified, publishes an edit after its removal.
    RevokedEdit,
    /// Device 0 makes an editor view-only, or a device it made view-only an editor again.
    Regrant,
    Reconnect,
}

/// A user-written version of some file (by manifest hash).
#[derive(Clone, Debug)]
pub struct Version {
    /// A user deleted or overwrote a copy of it: losing it is the user's choice.
    pub discarded: bool,
    /// The device whose user wrote it, and the path.
    pub origin: (usize, String),
}

/// The simulation.
pub struct World {
    config: Config,
    rng: Rng,
    now: i64,
    seq: u64,
    queue: BTreeMap<(i64, u64), Event>,
    /// The honest devices.
    pub devices: Vec<Device>,
    /// Pairs that may connect (a < b): some pairs never meet directly.
    allowed: BTreeSet<(usize, usize)>,
    cut: BTreeSet<(usize, usize)>,
    live: BTreeSet<(usize, usize)>,
    epoch: BTreeMap<(usize, usize), u64>,
    last_control: BTreeMap<(usize, usize), i64>,
    scan_pending: Vec<bool>,
    /// When each device's next [`Event::Recheck`] is scheduled.
    recheck_at: Vec<Option<i64>>,
    /// Every version users wrote.
    pub versions: BTreeMap<ManifestHash, Version>,
    intruder: DeviceId,
    intruder_content: ManifestHash,
    /// The view-only device, if the world has one.
    viewer: Option<usize>,
    /// The device removed from the access list, once it is.
    removed: Option<usize>,
    /// What the view-only device's forged edits write (never to reach a disk).
    vandal_content: ManifestHash,
    /// What the removed device's forged edits write (on no honest disk at the end).
    revoked_content: ManifestHash,
    /// Forged edits made so far (for unique paths).
    forged: u64,
    /// Devices device 0 made view-only for a while (editors again when the world heals).
    demoted: BTreeSet<usize>,
    /// Device 0 removed or demoted a device at some point.
    roles_changed: bool,
    active: bool,
    events: u64,
    trace_hasher: blake3::Hasher,
    trace: VecDeque<String>,
    stats: Stats,
}

/// What the view-only device's forged edits write.
const VANDAL_CONTENT: &[u8] = b"a view-only device's edit, never to be applied";
/// What the removed device's forged edits write.
const REVOKED_CONTENT: &[u8] = b"a removed device's edit, void everywhere";

/// A file entry of `content` written by `author` at `now`, as a device that writes the
/// document directly (not through its folder core) would put it.
fn file_entry(author: DeviceId, content: &[u8], now: i64) -> Entry {
    let manifest = manifest_of(content);
    Entry {
        kind: EntryKind::File,
        deleted: false,
        size: manifest.size(),
        mtime_ns: now,
        mode: 0o644,
        content: Content::Inline(manifest),
        author,
    }
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl World {
    /// A world for `seed`.
    pub fn new(seed: u64, config: Config) -> Self {
        let mut rng = Rng::new(seed);
        let n = config.devices.max(2);
        let mut devices: Vec<Device> = (0..n)
            .map(|index| {
                let mut secret = [0u8; 32];
                secret.copy_from_slice(&rng.bytes(32));
                Device::new(index, DeviceKey::from_secret_bytes(secret), &mut rng)
            })
            .collect();
        let ids: Vec<DeviceId> = devices.iter().map(|d| d.id).collect();
        for device in &mut devices {
            device.founder = ids[0];
            device.sabotage = config.sabotage;
            device.disk.coarse_timestamps = config.coarse_timestamps;
            device.members = ids.iter().copied().filter(|id| *id != device.id).collect();
        }
        // Topology: a random spanning tree (so everything can reach everything), plus
        // some extra links; a chain about a third of the time.
        let mut allowed = BTreeSet::new();
        let chain = rng.chance(33);
        for b in 1..n {
            let a = if chain { b - 1 } else { rng.index(b) };
            allowed.insert(pair(a, b));
        }
        if !chain {
            for _ in 0..rng.index(n) {
                let (a, b) = (rng.index(n), rng.index(n));
                if a != b {
                    allowed.insert(pair(a, b));
                }
            }
        }
        // A third of the worlds of three or more devices have a receive-only device
        // (the last): it applies what the others publish and publishes nothing. Its
        // user does not edit, so that every tree still converges exactly (a local
        // change there stays local by design: the black-box tests cover that).
        let mut viewer = None;
        if n >= 3 && rng.chance(33) {
            devices[n - 1].mode = weft_core::engine::FolderMode::ReceiveOnly;
            viewer = Some(n - 1);
        }
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&rng.bytes(32));
        let intruder = DeviceKey::from_secret_bytes(secret).device_id();
        let intruder_content = manifest_of(b"intruder's file, never to be synced").hash();
        let mut world = Self {
            config,
            rng,
            now: EPOCH_NS,
            seq: 0,
            queue: BTreeMap::new(),
            devices,
            allowed,
            cut: BTreeSet::new(),
            live: BTreeSet::new(),
            epoch: BTreeMap::new(),
            last_control: BTreeMap::new(),
            scan_pending: vec![false; n],
            recheck_at: vec![None; n],
            versions: BTreeMap::new(),
            intruder,
            intruder_content,
            viewer,
            removed: None,
            vandal_content: manifest_of(VANDAL_CONTENT).hash(),
            revoked_content: manifest_of(REVOKED_CONTENT).hash(),
            forged: 0,
            demoted: BTreeSet::new(),
            roles_changed: false,
            active: true,
            events: 0,
            trace_hasher: blake3::Hasher::new(),
            trace: VecDeque::new(),
            stats: Stats::default(),
        };
        // A removed device's forged edit may reach a disk before its removal does
        // (it is void, not refused, there): a version, but nobody's to keep.
        world.versions.insert(
            world.revoked_content,
            Version {
                discarded: true,
                origin: (usize::MAX, "forged".into()),
            },
        );
        world.trace(format!(
            "world: {n} devices, links {:?}{}",
            world.allowed,
            if chain { " (chain)" } else { "" }
        ));
        world
    }

    fn schedule(&mut self, delay: i64, event: Event) {
        self.seq += 1;
        self.queue
            .insert((self.now + delay.max(0), self.seq), event);
    }

    fn trace(&mut self, line: String) {
        let line = format!(
            "{:>6} {:>9.3} {line}",
            self.events,
            (self.now - EPOCH_NS) as f64 / 1e9
        );
        self.trace_hasher.update(line.as_bytes());
        self.trace_hasher.update(b"\n");
        self.trace.push_back(line);
        if !self.config.keep_trace && self.trace.len() > 40 {
            self.trace.pop_front();
        }
    }

    /// Runs the three phases and checks the invariants.
    pub fn run(mut self, seed: u64) -> Outcome {
        let violation = self.run_phases().err();
        if let Some(v) = &violation {
            self.trace(format!("VIOLATION {}: {}", v.invariant, v.detail));
        }
        if self.config.keep_trace {
            for index in 0..self.devices.len() {
                let lines: Vec<String> = self.devices[index]
                    .disk
                    .nodes()
                    .map(|(path, node)| match node {
                        Node::File { data, .. } => {
                            format!(
                                "dev{index} has {path} {}",
                                &manifest_of(data).hash().to_hex()[..8]
                            )
                        }
                        Node::Dir => format!("dev{index} has {path}/"),
                        Node::Symlink { target, .. } => {
                            format!("dev{index} has {path} -> {target}")
                        }
                    })
                    .collect();
                for line in lines {
                    self.trace(line);
                }
                let rows = self.devices[index].describe_rows();
                for line in rows {
                    self.trace(format!("dev{index} row {line}"));
                }
                let versions: Vec<String> = self.devices[index]
                    .store
                    .versions
                    .keys()
                    .map(|h| h.to_hex()[..8].to_owned())
                    .collect();
                self.trace(format!("dev{index} version store {versions:?}"));
            }
        }
        let first = &self.devices[0];
        self.stats.files = first.disk.files().len() as u64;
        self.stats.conflict_copies = first
            .disk
            .files()
            .iter()
            .filter(|p| p.contains(weft_core::engine::CONFLICT_MARKER))
            .count() as u64;
        Outcome {
            seed,
            devices: self.devices.len(),
            events: self.events,
            trace_hash: *self.trace_hasher.finalize().as_bytes(),
            trace: self.trace.into_iter().collect(),
            violation,
            stats: self.stats,
        }
    }

    fn run_phases(&mut self) -> Result<(), Violation> {
        let n = self.devices.len();
        for index in 0..n {
            self.devices[index].start(self.now);
            let jitter = self.rng.below(FULL_SCAN as u64) as i64;
            self.schedule(FULL_SCAN / 2 + jitter, Event::FullScan(index));
            self.schedule(RETRY + index as i64 * MS, Event::Retry(index));
            let first = self.rng.below(300) as i64 * MS;
            if self.devices[index].mode == weft_core::engine::FolderMode::ReceiveOnly {
                self.trace(format!("dev{index} is receive-only"));
            } else {
                self.schedule(first, Event::User(index));
            }
        }
        self.found()?;
        self.refresh_links();
        if self.viewer.is_some() {
            let delay = self.rng.range(500, 5_000) as i64 * MS;
            self.schedule(delay, Event::Vandal);
        }
        if n >= 3 && self.rng.chance(33) {
            let delay = self.rng.range(1_000, 12_000) as i64 * MS;
            self.schedule(delay, Event::Revoke);
        }
        if self.rng.chance(33) {
            let delay = self.rng.range(500, 6_000) as i64 * MS;
            self.schedule(delay, Event::Regrant);
        }
        if self.config.faults {
            let delay = self.rng.range(1_000, 8_000) as i64 * MS;
            self.schedule(delay, Event::Partition);
            let victim = self.rng.index(n);
            let delay = self.rng.range(500, 6_000) as i64 * MS;
            self.schedule(delay, Event::Crash(victim));
            let full = self.rng.index(n);
            let delay = self.rng.range(2_000, 20_000) as i64 * MS;
            self.schedule(delay, Event::DiskFull(full));
            for device in &mut self.devices {
                device.disk.fail_percent = 2;
            }
        }
        let delay = self.rng.range(100, 3_000) as i64 * MS;
        self.schedule(delay, Event::Intruder);
        self.drain_all()?;
        // 1. Active.
        while self.events < self.config.steps {
            if !self.step()? {
                break;
            }
        }
        // 2. Heal.
        self.active = false;
        self.trace("heal: faults stop, devices restart, partitions heal".into());
        for device in &mut self.devices {
            device.disk.fail_percent = 0;
            device.disk.full = false;
        }
        self.cut.clear();
        for index in 0..n {
            if !self.devices[index].up {
                self.devices[index].start(self.now);
                self.drain(index)?;
            }
        }
        self.restore_roles()?;
        self.refresh_links();
        self.drain_all()?;
        // 3. Settle: run until quiet; then a full scan everywhere must change nothing.
        let deadline = self.now + SETTLE_LIMIT;
        loop {
            self.run_until_quiet(deadline)?;
            let before: Vec<u64> = self.devices.iter().map(|d| d.store.commits).collect();
            for index in 0..n {
                self.devices[index].full_scan(self.now);
                self.drain(index)?;
            }
            self.run_until_quiet(deadline)?;
            let after: Vec<u64> = self.devices.iter().map(|d| d.store.commits).collect();
            if before == after {
                break;
            }
        }
        self.trace("quiet".into());
        check::converged(self)?;
        check::revocation_held(self)?;
        check::nothing_lost(self)?;
        Ok(())
    }

    fn run_until_quiet(&mut self, deadline: i64) -> Result<(), Violation> {
        while !self.quiet() {
            if self.now > deadline {
                return Err(Violation::new(
                    "termination",
                    format!(
                        "not quiet {} s after healing: {}",
                        SETTLE_LIMIT / 1_000_000_000,
                        self.busy_summary()
                    ),
                ));
            }
            if !self.step()? {
                break;
            }
        }
        Ok(())
    }

    /// No messages in flight and no scans due; every device idle, or waiting only to
    /// retry downloads of content that no device holds any more (a version its
    /// author's user overwrote before anyone fetched it: nothing can bring it back,
    /// and the node retries at a slow, fixed pace, which is not a sync loop).
    fn quiet(&mut self) -> bool {
        let events_quiet = self.queue.values().all(|e| {
            matches!(
                e,
                Event::FullScan(_)
                    | Event::Retry(_)
                    | Event::User(_)
                    | Event::Intruder
                    | Event::Vandal
                    | Event::RevokedEdit
                    | Event::Timeout { .. }
            )
        });
        if !events_quiet {
            return false;
        }
        // The removed device has left the folder: what it still wants, nobody gives it.
        let removed = self.removed;
        if self
            .devices
            .iter()
            .all(|d| Some(d.index) == removed || d.is_idle())
        {
            return true;
        }
        let obtainable = |world: &World, entry: &Entry| -> bool {
            let manifest = match &entry.content {
                Content::Inline(manifest) => Some(manifest.clone()),
                Content::Manifest(hash) => world
                    .devices
                    .iter()
                    .filter(|d| Some(d.index) != world.removed)
                    .find_map(|d| d.store.manifests.get(hash).cloned()),
                _ => return true,
            };
            manifest.is_some_and(|m| {
                m.blocks().iter().all(|b| {
                    world
                        .devices
                        .iter()
                        .filter(|d| Some(d.index) != world.removed)
                        .any(|d| d.find_block(&b.hash).is_some())
                })
            })
        };
        let mut wants = Vec::new();
        for device in &mut self.devices {
            if Some(device.index) == removed {
                continue;
            }
            if !device.is_idle_but_failed() {
                return false;
            }
            wants.extend(device.failed_wants());
        }
        wants.iter().all(|want| {
            want.as_ref()
                .is_some_and(|entry| !entry.deleted && !obtainable(self, entry))
        })
    }

    fn busy_summary(&self) -> String {
        let pending: Vec<String> = self
            .queue
            .values()
            .filter(|e| !matches!(e, Event::FullScan(_) | Event::Retry(_) | Event::User(_)))
            .take(5)
            .map(|e| format!("{e:?}").chars().take(80).collect())
            .collect();
        let busy: Vec<String> = self
            .devices
            .iter()
            .filter(|d| !d.is_idle())
            .map(|d| format!("dev{} downloading {:?}", d.index, d.downloading()))
            .collect();
        format!("events {pending:?}; devices {busy:?}")
    }

    /// Processes one event. `false` when nothing is left.
    fn step(&mut self) -> Result<bool, Violation> {
        let Some((&(time, seq), _)) = self.queue.iter().next() else {
            return Ok(false);
        };
        let Some(event) = self.queue.remove(&(time, seq)) else {
            return Ok(false);
        };
        self.now = self.now.max(time);
        self.events += 1;
        self.handle(event)?;
        check::every_step(self)?;
        Ok(true)
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::User(index) => {
                if self.active {
                    self.user_op(index);
                    let delay = self.rng.range(20, 600) as i64 * MS;
                    self.schedule(delay, Event::User(index));
                }
                self.drain(index)?;
            }
            Event::ScanDirty(index) => {
                self.scan_pending[index] = false;
                if self.devices[index].up {
                    self.trace(format!("dev{index} scans dirty paths"));
                    self.devices[index].scan_dirty(self.now);
                    self.drain(index)?;
                }
            }
            Event::Recheck(index) => {
                self.recheck_at[index] = None;
                if self.devices[index].up {
                    self.trace(format!("dev{index} hashes racy files again"));
                    self.devices[index].recheck(self.now);
                    self.drain(index)?;
                }
            }
            Event::FullScan(index) => {
                if self.devices[index].up {
                    self.trace(format!("dev{index} full scan"));
                    self.devices[index].full_scan(self.now);
                    self.drain(index)?;
                }
                let jitter = self.rng.below(FULL_SCAN as u64 / 5) as i64;
                self.schedule(FULL_SCAN + jitter, Event::FullScan(index));
            }
            Event::Retry(index) => {
                if self.devices[index].up {
                    self.devices[index].retry(self.now);
                    self.drain(index)?;
                }
                self.schedule(RETRY, Event::Retry(index));
            }
            Event::Deliver {
                from,
                to,
                epoch,
                msg,
            } => {
                let link = pair(from, to);
                let intruder = from == usize::MAX;
                if !intruder && self.epoch.get(&link).copied().unwrap_or(0) != epoch
                    || !self.devices[to].up
                {
                    self.stats.lost += 1;
                    return Ok(());
                }
                self.stats.delivered += 1;
                let sender = if intruder {
                    self.intruder
                } else {
                    self.devices[from].id
                };
                self.trace(format!(
                    "dev{to} <- {} {}",
                    short_index(from),
                    describe(&msg)
                ));
                self.devices[to].receive(sender, msg, self.now);
                self.drain(to)?;
            }
            Event::Timeout { device, id } => {
                if self.devices[device].up {
                    self.devices[device].timeout(id, self.now);
                    self.drain(device)?;
                }
            }
            Event::Crash(index) => {
                if self.active && self.devices[index].up {
                    self.crash(index);
                    let down = self.rng.range(200, 5_000) as i64 * MS;
                    self.schedule(down, Event::Restart(index));
                }
                if self.active {
                    let next = self.rng.index(self.devices.len());
                    // Half of the crashes hit the moment after a download is renamed
                    // into place and before the store records it.
                    if self.rng.chance(50) {
                        self.devices[next].crash_after_rename = true;
                    }
                    let delay = self.rng.range(1_000, 8_000) as i64 * MS;
                    self.schedule(delay, Event::Crash(next));
                }
            }
            Event::Restart(index) => {
                if !self.devices[index].up {
                    self.trace(format!("dev{index} restarts"));
                    self.devices[index].start(self.now);
                    self.drain(index)?;
                    self.refresh_links();
                }
            }
            Event::Partition => {
                if self.active {
                    let links: Vec<(usize, usize)> = self.allowed.iter().copied().collect();
                    self.cut.clear();
                    for link in links {
                        if self.rng.chance(40) {
                            self.cut.insert(link);
                        }
                    }
                    self.trace(format!("partition: cut {:?}", self.cut));
                    self.refresh_links();
                    let heal = self.rng.range(500, 6_000) as i64 * MS;
                    self.schedule(heal, Event::Heal);
                }
            }
            Event::Heal => {
                if self.active {
                    self.cut.clear();
                    self.trace("partition healed".into());
                    self.refresh_links();
                    let next = self.rng.range(1_000, 8_000) as i64 * MS;
                    self.schedule(next, Event::Partition);
                }
            }
            Event::DiskFull(index) => {
                if self.active {
                    self.trace(format!("dev{index} disk full"));
                    self.devices[index].disk.full = true;
                    let free = self.rng.range(300, 4_000) as i64 * MS;
                    self.schedule(free, Event::DiskFreed(index));
                }
            }
            Event::DiskFreed(index) => {
                self.devices[index].disk.full = false;
                self.trace(format!("dev{index} disk has space again"));
                if self.active {
                    let next = self.rng.index(self.devices.len());
                    let delay = self.rng.range(3_000, 20_000) as i64 * MS;
                    self.schedule(delay, Event::DiskFull(next));
                }
            }
            Event::Intruder => self.intrude(),
            Event::Vandal => {
                self.forge_again(self.viewer, VANDAL_CONTENT, Event::Vandal, (1_000, 6_000))?;
            }
            Event::Revoke => self.revoke()?,
            Event::Regrant => {
                if self.active {
                    self.regrant()?;
                    let next = self.rng.range(500, 6_000) as i64 * MS;
                    self.schedule(next, Event::Regrant);
                }
            }
            Event::RevokedEdit => {
                let removed = self.removed;
                self.forge_again(removed, REVOKED_CONTENT, Event::RevokedEdit, (500, 4_000))?;
            }
            Event::Reconnect => self.refresh_links(),
        }
        Ok(())
    }

    fn crash(&mut self, index: usize) {
        self.stats.crashes += 1;
        // Half of the crashes are power losses: directory changes the node had not
        // synced yet are gone too (disk.rs).
        if self.rng.chance(50) {
            let undone = self.devices[index].disk.lose_unsynced();
            self.trace(format!(
                "dev{index} loses power ({undone} unsynced directory changes undone)"
            ));
        } else {
            self.trace(format!("dev{index} crashes"));
        }
        self.devices[index].crash();
        self.refresh_links();
    }

    /// Connects and disconnects links to match `allowed`, `cut` and devices being up.
    fn refresh_links(&mut self) {
        let links: Vec<(usize, usize)> = self.allowed.iter().copied().collect();
        for (a, b) in links {
            let should = !self.cut.contains(&(a, b)) && self.devices[a].up && self.devices[b].up;
            let is = self.live.contains(&(a, b));
            if should == is {
                continue;
            }
            *self.epoch.entry((a, b)).or_default() += 1;
            self.last_control.remove(&(a, b));
            self.last_control.remove(&(b, a));
            let (id_a, id_b) = (self.devices[a].id, self.devices[b].id);
            if should {
                self.live.insert((a, b));
                self.trace(format!("link dev{a}-dev{b} up"));
                self.devices[a].peer_connected(id_b, self.now);
                self.devices[b].peer_connected(id_a, self.now);
            } else {
                self.live.remove(&(a, b));
                self.trace(format!("link dev{a}-dev{b} down"));
                if self.devices[a].up {
                    self.devices[a].peer_disconnected(id_b, self.now);
                }
                if self.devices[b].up {
                    self.devices[b].peer_disconnected(id_a, self.now);
                }
            }
        }
        // Connecting may have produced messages and crash points.
        for index in 0..self.devices.len() {
            let _ = self.drain(index);
        }
    }

    fn drain_all(&mut self) -> Result<(), Violation> {
        for index in 0..self.devices.len() {
            self.drain(index)?;
        }
        Ok(())
    }

    /// Takes a device's output: log lines to the trace, messages to the network, and a
    /// crash point it hit.
    fn drain(&mut self, index: usize) -> Result<(), Violation> {
        let log = std::mem::take(&mut self.devices[index].log);
        for line in log {
            self.trace(format!("dev{index}: {line}"));
        }
        if self.devices[index].crashed {
            self.crash(index);
            let down = self.rng.range(200, 3_000) as i64 * MS;
            self.schedule(down, Event::Restart(index));
            return Ok(());
        }
        let outbox = std::mem::take(&mut self.devices[index].outbox);
        for (to_id, msg) in outbox {
            let Some(to) = self.devices.iter().position(|d| d.id == to_id) else {
                continue;
            };
            self.send(index, to, msg);
        }
        // A device the folder core disconnects (its sync kept failing) reconnects a
        // moment later, as the node's peers dial again.
        let disconnects = std::mem::take(&mut self.devices[index].disconnects);
        for peer in disconnects {
            let Some(other) = self.devices.iter().position(|d| d.id == peer) else {
                continue;
            };
            let link = pair(index, other);
            self.trace(format!("dev{index} disconnects dev{other}"));
            self.cut.insert(link);
            self.refresh_links();
            self.cut.remove(&link);
            let delay = self.rng.range(10, 500) as i64 * MS;
            self.schedule(delay, Event::Reconnect);
        }
        // The node's run loop wakes up when a racy file is due.
        if let Some(due) = self.devices[index].next_recheck()
            && self.recheck_at[index].is_none_or(|at| at > due)
        {
            self.recheck_at[index] = Some(due);
            self.schedule(due - self.now, Event::Recheck(index));
        }
        Ok(())
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let link = pair(from, to);
        if !self.live.contains(&link) {
            self.stats.lost += 1;
            return;
        }
        let epoch = self.epoch.get(&link).copied().unwrap_or(0);
        let faults = self.config.faults && self.active;
        if let Some(id) = msg.request_id() {
            self.schedule(REQUEST_TIMEOUT, Event::Timeout { device: from, id });
        }
        let latency = self.rng.range(1, 40) as i64 * MS;
        if msg.is_control() {
            // One ordered stream per direction. A full queue makes the node close the
            // connection (net.rs), which comes back a moment later.
            if faults && self.rng.chance(2) {
                self.stats.lost += 1;
                self.trace(format!(
                    "dev{from} -> dev{to} control queue full: disconnect"
                ));
                self.cut.insert(link);
                self.refresh_links();
                self.cut.remove(&link);
                let delay = self.rng.range(10, 500) as i64 * MS;
                self.schedule(delay, Event::Reconnect);
                return;
            }
            let at = (self.now + latency)
                .max(self.last_control.get(&(from, to)).copied().unwrap_or(0) + 1);
            self.last_control.insert((from, to), at);
            self.seq += 1;
            self.queue.insert(
                (at, self.seq),
                Event::Deliver {
                    from,
                    to,
                    epoch,
                    msg,
                },
            );
            return;
        }
        // Block streams: independent, so they reorder; they may fail or repeat.
        let mut msg = msg;
        if faults {
            if self.rng.chance(3) {
                self.stats.lost += 1;
                return;
            }
            if let Msg::Blocks { blocks, .. } = &mut msg
                && self.rng.chance(3)
                && let Some((_, Some(data))) = blocks.first_mut()
                && !data.is_empty()
            {
                data[0] ^= 0x55;
            }
            if self.rng.chance(3) {
                let again = self.rng.range(1, 60) as i64 * MS;
                self.schedule(
                    again,
                    Event::Deliver {
                        from,
                        to,
                        epoch,
                        msg: msg.clone(),
                    },
                );
            }
        }
        self.schedule(
            latency,
            Event::Deliver {
                from,
                to,
                epoch,
                msg,
            },
        );
    }

    /// An unaccepted device connects to device 0 and pushes its own version of the
    /// folder: a sync message with an entry, and a block request.
    fn intrude(&mut self) {
        let mut secret = [0u8; 8];
        secret.copy_from_slice(&self.rng.bytes(8));
        let mut document =
            FolderDocument::new(weft_protocol::document::actor_id(&self.intruder, secret));
        let entry = file_entry(
            self.intruder,
            b"intruder's file, never to be synced",
            self.now,
        );
        let Ok(path) = RelPath::new(NAMES[0]) else {
            return;
        };
        let _ = document.put(&path, &entry);
        document.commit(self.now / MS, "intrusion");
        let mut state = SyncState::new();
        if let Some(bytes) = document.generate_sync_message(&mut state) {
            self.trace("intruder -> dev0 sync message".into());
            self.seq += 1;
            self.queue.insert(
                (self.now + MS, self.seq),
                Event::Deliver {
                    from: usize::MAX,
                    to: 0,
                    epoch: 0,
                    msg: Msg::DocSync {
                        signatures: Vec::new(),
                        message: bytes,
                    },
                },
            );
        }
        if self.active {
            let next = self.rng.range(2_000, 10_000) as i64 * MS;
            self.schedule(next, Event::Intruder);
        }
    }

    /// Device 0 founds the folder (at its start) and gives every other device its
    /// role: `edit`, or `view` for the view-only device.
    fn found(&mut self) -> Result<(), Violation> {
        for index in 1..self.devices.len() {
            let role = if Some(index) == self.viewer {
                Role::View
            } else {
                Role::Edit
            };
            let id = self.devices[index].id;
            if let Err(error) = self.devices[0].set_access(self.now, id, Some(role)) {
                return Err(Violation::new(
                    "sharing",
                    format!("the founder could not share the folder with dev{index}: {error}"),
                ));
            }
        }
        self.trace("dev0 founded the folder and shared it".into());
        self.drain(0)
    }

    /// Device 0 removes a device that is neither itself nor the view-only one and
    /// whose absence leaves the others connected. The removed device goes on running
    /// (its user edits, its node syncs with whoever still talks to it), and forges
    /// edits from then on.
    fn revoke(&mut self) -> Result<(), Violation> {
        if self.removed.is_some() || !self.active {
            return Ok(());
        }
        if !self.devices[0].up {
            self.schedule(500 * MS, Event::Revoke);
            return Ok(());
        }
        let n = self.devices.len();
        let candidates: Vec<usize> = (1..n)
            .filter(|r| Some(*r) != self.viewer && self.connected_without(*r))
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let removed = candidates[self.rng.index(candidates.len())];
        let id = self.devices[removed].id;
        if let Err(error) = self.devices[0].set_access(self.now, id, None) {
            // A store that fails now and then fails this too: the user tries again.
            self.trace(format!("dev0 could not remove dev{removed}: {error}"));
            self.schedule(500 * MS, Event::Revoke);
            return self.drain(0);
        }
        self.removed = Some(removed);
        self.roles_changed = true;
        self.trace(format!("dev0 removed dev{removed} from the folder"));
        self.drain(0)?;
        let delay = self.rng.range(10, 2_000) as i64 * MS;
        self.schedule(delay, Event::RevokedEdit);
        Ok(())
    }

    /// Device 0 makes a random editor view-only, or gives a demoted device `edit` back.
    /// A demoted device's user goes on editing: those edits stay local until it may
    /// edit again (and one made concurrently with its demotion is void).
    fn regrant(&mut self) -> Result<(), Violation> {
        if !self.devices[0].up {
            return Ok(());
        }
        let candidates: Vec<usize> = (1..self.devices.len())
            .filter(|d| Some(*d) != self.viewer && Some(*d) != self.removed)
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let device = candidates[self.rng.index(candidates.len())];
        let demote = !self.demoted.contains(&device);
        let role = if demote { Role::View } else { Role::Edit };
        let id = self.devices[device].id;
        if let Err(error) = self.devices[0].set_access(self.now, id, Some(role)) {
            // A store that fails now and then fails this too; the user sees why.
            self.trace(format!("dev0 could not make dev{device} {role}: {error}"));
            return self.drain(0);
        }
        self.roles_changed = true;
        if demote {
            self.demoted.insert(device);
        } else {
            self.demoted.remove(&device);
        }
        self.trace(format!("dev0 makes dev{device} {role}"));
        self.drain(0)
    }

    /// Heal: device 0 (up again by now) makes every demoted device an editor again.
    fn restore_roles(&mut self) -> Result<(), Violation> {
        // It may have hit a crash point armed before the heal: up again first.
        if !self.devices[0].up {
            self.devices[0].start(self.now);
            self.drain(0)?;
        }
        let demoted: Vec<usize> = std::mem::take(&mut self.demoted).into_iter().collect();
        for device in demoted {
            let id = self.devices[device].id;
            if let Err(error) = self.devices[0].set_access(self.now, id, Some(Role::Edit)) {
                return Err(Violation::new(
                    "sharing",
                    format!("the founder could not make dev{device} an editor again: {error}"),
                ));
            }
            self.trace(format!("heal: dev0 makes dev{device} edit again"));
        }
        self.drain(0)
    }

    /// True if every device but `without` can reach every other over allowed links.
    fn connected_without(&self, without: usize) -> bool {
        let n = self.devices.len();
        let start = if without == 0 { 1 } else { 0 };
        let mut reached = BTreeSet::from([start]);
        let mut stack = vec![start];
        while let Some(at) = stack.pop() {
            for &(a, b) in &self.allowed {
                let next = if a == at {
                    b
                } else if b == at {
                    a
                } else {
                    continue;
                };
                if next != without && reached.insert(next) {
                    stack.push(next);
                }
            }
        }
        reached.len() == n - 1
    }

    /// Device `from`, modified, publishes an edit its role does not allow (or, once
    /// removed, one made after its removal): a change of its own on top of what a live
    /// neighbour holds, signed with its key, sent to that neighbour.
    fn forge(&mut self, from: usize, content: &[u8]) -> Result<(), Violation> {
        let neighbours: Vec<usize> = self
            .live
            .iter()
            .filter_map(|&(a, b)| match (a == from, b == from) {
                (true, _) => Some(b),
                (_, true) => Some(a),
                _ => None,
            })
            .collect();
        if neighbours.is_empty() || !self.devices[from].up {
            return Ok(());
        }
        let to = neighbours[self.rng.index(neighbours.len())];
        let Some(base) = self.devices[to].document().map(|d| d.save()) else {
            return Ok(());
        };
        let mut suffix = [0u8; 8];
        suffix.copy_from_slice(&self.rng.bytes(8));
        let author = self.devices[from].id;
        let actor = weft_protocol::document::actor_id(&author, suffix);
        let Ok(mut forged) = FolderDocument::load(&base, [], actor) else {
            return Ok(());
        };
        let mut mirror = match FolderDocument::load(
            &base,
            [],
            weft_protocol::document::actor_id(&author, [0xff; 8]),
        ) {
            Ok(mirror) => mirror,
            Err(_) => return Ok(()),
        };
        self.forged += 1;
        let entry = file_entry(author, content, self.now);
        let name = NAMES[self.rng.index(NAMES.len())];
        let Ok(path) = RelPath::new(&format!("{name}-forged{}", self.forged)) else {
            return Ok(());
        };
        let _ = forged.put(&path, &entry);
        forged.commit(self.now / MS, "forged");
        // The neighbour's sync state is its own: run the protocol against a copy of its
        // document until a message carries the change.
        let (mut mine, mut theirs) = (SyncState::new(), SyncState::new());
        for _ in 0..6 {
            let Some((bytes, changes)) = forged.generate_sync_message_with_changes(&mut mine)
            else {
                break;
            };
            if !changes.is_empty() {
                let key = self.devices[from].key.clone();
                let signatures = changes
                    .iter()
                    .map(|change| SignedChange::sign(&key, &crate::device::folder_id(), change))
                    .collect();
                self.trace(format!(
                    "dev{from} forges {path} ({} change) -> dev{to}",
                    changes.len()
                ));
                self.send(
                    from,
                    to,
                    Msg::DocSync {
                        signatures,
                        message: bytes,
                    },
                );
                return self.drain(from);
            }
            let _ = mirror.receive_sync_message(&mut theirs, &bytes);
            if let Some(reply) = mirror.generate_sync_message(&mut theirs) {
                let _ = forged.receive_sync_message(&mut mine, &reply);
            }
        }
        Ok(())
    }

    /// `device` (if any) forges an edit of `content`; while the world is active, `next`
    /// comes again after a delay in `between` (ms).
    fn forge_again(
        &mut self,
        device: Option<usize>,
        content: &[u8],
        next: Event,
        between: (u64, u64),
    ) -> Result<(), Violation> {
        if let Some(device) = device {
            self.forge(device, content)?;
        }
        if self.active {
            let delay = self.rng.range(between.0, between.1) as i64 * MS;
            self.schedule(delay, next);
        }
        Ok(())
    }

    /// What the view-only device's forged edits hold.
    pub fn vandal_content(&self) -> ManifestHash {
        self.vandal_content
    }

    /// What the removed device's forged edits hold.
    pub fn revoked_content(&self) -> ManifestHash {
        self.revoked_content
    }

    /// The device removed from the access list, if one was.
    pub fn removed(&self) -> Option<usize> {
        self.removed
    }

    /// Device 0 removed or demoted a device at some point.
    pub fn roles_changed(&self) -> bool {
        self.roles_changed
    }

    /// The intruder's content hash (must never appear on an honest device).
    pub fn intruder_content(&self) -> ManifestHash {
        self.intruder_content
    }

    // ---- users --------------------------------------------------------------------

    fn content(&mut self, large: bool) -> Vec<u8> {
        let len = if large {
            self.rng.range(300, 1_200)
        } else {
            self.rng.range(0, 90)
        } as usize;
        self.rng.bytes(len)
    }

    /// Records a version a user wrote (once it is on the disk: a write that failed
    /// made none).
    fn record_write(&mut self, index: usize, path: &str, hash: ManifestHash) {
        self.versions.entry(hash).or_insert_with(|| Version {
            discarded: false,
            origin: (index, path.to_owned()),
        });
    }

    fn discard(&mut self, data: &[u8]) {
        if let Some(version) = self.versions.get_mut(&manifest_of(data).hash()) {
            version.discarded = true;
        }
    }

    fn random_dir(&mut self, index: usize) -> Option<String> {
        let mut dirs = vec![String::new()];
        dirs.extend(self.devices[index].disk.directories());
        let dir = self.rng.pick(&dirs)?.clone();
        Some(dir)
    }

    fn join(dir: &str, name: &str) -> String {
        if dir.is_empty() {
            name.to_owned()
        } else {
            format!("{dir}/{name}")
        }
    }

    fn touched(&mut self, index: usize, paths: &[&str]) {
        let device = &mut self.devices[index];
        if !device.up {
            return;
        }
        for path in paths {
            if let Ok(path) = RelPath::new(path) {
                device.dirty.insert(path);
            }
        }
        if !self.scan_pending[index] {
            self.scan_pending[index] = true;
            self.schedule(SCAN_DELAY, Event::ScanDirty(index));
        }
    }

    /// One user action on device `index` (its node may be down: users edit offline).
    fn user_op(&mut self, index: usize) {
        self.stats.user_ops += 1;
        let files = self.devices[index].disk.files();
        let roll = self.rng.below(100);
        let now = self.now;
        match roll {
            // Replace a file by a directory of the same name, with a file in it.
            0..=1 => {
                let Some(path) = self.rng.pick(&files).cloned() else {
                    return;
                };
                if path.matches('/').count() >= 2 {
                    return;
                }
                let Some(old) = self.devices[index].disk.read(&path).map(<[u8]>::to_vec) else {
                    return;
                };
                if self.devices[index]
                    .disk
                    .remove_file(&path, 100, false)
                    .is_err()
                {
                    return;
                }
                self.discard(&old);
                self.trace(format!(
                    "dev{index} user replaces file {path} by a directory"
                ));
                self.touched(index, &[&path]);
                if self.devices[index]
                    .disk
                    .create_dir_all(&path, 100, false)
                    .is_ok()
                {
                    let inner = Self::join(&path, NAMES[self.rng.index(NAMES.len())]);
                    let data = self.content(false);
                    self.write(index, &inner, data, "creates");
                }
            }
            // Create a file.
            2..=19 => {
                let Some(dir) = self.random_dir(index) else {
                    return;
                };
                let name = NAMES[self.rng.index(NAMES.len())];
                let path = Self::join(&dir, name);
                let large = self.rng.chance(25);
                let data = self.content(large);
                self.write(index, &path, data, "creates");
            }
            // Overwrite, edit in place, or append.
            20..=39 => {
                let Some(path) = self.rng.pick(&files).cloned() else {
                    return;
                };
                let Some(old) = self.devices[index].disk.read(&path).map(<[u8]>::to_vec) else {
                    return;
                };
                let data = match self.rng.below(3) {
                    0 => {
                        let large = self.rng.chance(25);
                        self.content(large)
                    }
                    1 if !old.is_empty() => {
                        let mut data = old.clone();
                        let at = self.rng.index(data.len());
                        data[at] = data[at].wrapping_add(1);
                        data
                    }
                    _ => {
                        let mut data = old.clone();
                        let more = self.rng.range(1, 40) as usize;
                        data.extend(self.rng.bytes(more));
                        data
                    }
                };
                self.write(index, &path, data, "modifies");
            }
            // Truncate.
            40..=44 => {
                let Some(path) = self.rng.pick(&files).cloned() else {
                    return;
                };
                let Some(old) = self.devices[index].disk.read(&path).map(<[u8]>::to_vec) else {
                    return;
                };
                let keep = self.rng.index(old.len() + 1);
                self.write(index, &path, old[..keep].to_vec(), "truncates");
            }
            // Delete a file.
            45..=54 => {
                let Some(path) = self.rng.pick(&files).cloned() else {
                    return;
                };
                let data = self.devices[index].disk.read(&path).map(<[u8]>::to_vec);
                if self.devices[index]
                    .disk
                    .remove_file(&path, 100, false)
                    .is_ok()
                {
                    if let Some(data) = data {
                        self.discard(&data);
                    }
                    self.trace(format!("dev{index} user deletes {path}"));
                    self.touched(index, &[&path]);
                }
            }
            // Rename or move a file (possibly over another file).
            55..=69 => {
                let Some(from) = self.rng.pick(&files).cloned() else {
                    return;
                };
                let Some(dir) = self.random_dir(index) else {
                    return;
                };
                let name = NAMES[self.rng.index(NAMES.len())];
                let to = Self::join(&dir, name);
                let replaced = self.devices[index].disk.read(&to).map(<[u8]>::to_vec);
                if self.devices[index]
                    .disk
                    .rename(&from, &to, 100, false)
                    .is_ok()
                {
                    if let Some(data) = replaced
                        && from != to
                    {
                        self.discard(&data);
                    }
                    self.trace(format!("dev{index} user moves {from} -> {to}"));
                    self.touched(index, &[&from, &to]);
                }
            }
            // Make a directory.
            70..=77 => {
                let Some(dir) = self.random_dir(index) else {
                    return;
                };
                if dir.matches('/').count() >= 2 {
                    return;
                }
                let name = DIRS[self.rng.index(DIRS.len())];
                let path = Self::join(&dir, name);
                if self.devices[index]
                    .disk
                    .create_dir_all(&path, 100, false)
                    .is_ok()
                {
                    self.trace(format!("dev{index} user mkdir {path}"));
                    self.touched(index, &[&path]);
                }
            }
            // rm -rf a directory.
            78..=80 => {
                let dirs = self.devices[index].disk.directories();
                let Some(dir) = self.rng.pick(&dirs).cloned() else {
                    return;
                };
                let removed = self.devices[index].disk.remove_tree(&dir);
                for data in &removed {
                    self.discard(data);
                }
                self.trace(format!(
                    "dev{index} user rm -rf {dir} ({} files)",
                    removed.len()
                ));
                self.touched(index, &[&dir]);
            }
            // Move a directory.
            81..=83 => {
                let dirs = self.devices[index].disk.directories();
                let Some(from) = self.rng.pick(&dirs).cloned() else {
                    return;
                };
                let Some(dir) = self.random_dir(index) else {
                    return;
                };
                let to = Self::join(&dir, DIRS[self.rng.index(DIRS.len())]);
                if self.devices[index]
                    .disk
                    .rename(&from, &to, 100, false)
                    .is_ok()
                {
                    self.trace(format!("dev{index} user moves dir {from} -> {to}"));
                    self.touched(index, &[&from, &to]);
                }
            }
            // chmod.
            84..=87 => {
                let Some(path) = self.rng.pick(&files).cloned() else {
                    return;
                };
                if let Some(Node::File { data, mode, .. }) =
                    self.devices[index].disk.get(&path).cloned()
                {
                    let new_mode = if mode & 0o111 == 0 { 0o755 } else { 0o644 };
                    let _ = self.devices[index]
                        .disk
                        .write_file(&path, data, new_mode, now, 100, false);
                    self.devices[index].disk.set_times(&path, new_mode, now);
                    self.trace(format!("dev{index} user chmod {path} {new_mode:o}"));
                    self.touched(index, &[&path]);
                }
            }
            // A symlink (recorded, never followed).
            88..=89 => {
                let Some(dir) = self.random_dir(index) else {
                    return;
                };
                let name = if self.rng.chance(50) {
                    DIRS[self.rng.index(DIRS.len())]
                } else {
                    NAMES[self.rng.index(NAMES.len())]
                };
                let path = Self::join(&dir, name);
                if self.devices[index]
                    .disk
                    .symlink("/etc", &path, 100, false)
                    .is_ok()
                {
                    self.trace(format!("dev{index} user symlink {path} -> /etc"));
                    self.touched(index, &[&path]);
                }
            }
            // Edit a file this device is downloading right now.
            90..=94 => {
                let downloading = self.devices[index].downloading();
                let Some(path) = self.rng.pick(&downloading).cloned() else {
                    return;
                };
                let data = self.content(false);
                if let Some(old) = self.devices[index]
                    .disk
                    .read(path.as_str())
                    .map(<[u8]>::to_vec)
                {
                    self.discard(&old);
                }
                self.write(index, path.as_str(), data, "edits while it syncs in");
            }
            // The same file edited on two devices at once.
            _ => {
                let Some(path) = self.rng.pick(&files).cloned() else {
                    return;
                };
                let other =
                    (index + 1 + self.rng.index(self.devices.len() - 1)) % self.devices.len();
                let mine = self.content(false);
                self.write(index, &path, mine, "edits (concurrently)");
                let receive_only =
                    self.devices[other].mode == weft_core::engine::FolderMode::ReceiveOnly;
                if !receive_only && self.devices[other].disk.read(&path).is_some() {
                    let theirs = self.content(false);
                    self.write(other, &path, theirs, "edits (concurrently)");
                }
            }
        }
    }

    fn write(&mut self, index: usize, path: &str, data: Vec<u8>, what: &str) {
        let old = self.devices[index].disk.read(path).map(<[u8]>::to_vec);
        let mode = match self.devices[index].disk.get(path) {
            Some(Node::File { mode, .. }) => *mode,
            _ => 0o644,
        };
        // On coarse timestamps, half of the rewrites keep the size: the write the
        // metadata cannot show.
        let data = match &old {
            Some(old) if self.config.coarse_timestamps && self.rng.chance(50) => {
                self.rng.bytes(old.len())
            }
            _ => data,
        };
        let len = data.len();
        let hash = manifest_of(&data).hash();
        let now = self.now;
        match self.devices[index]
            .disk
            .write_file(path, data, mode, now, 100, false)
        {
            Ok(()) => {
                self.record_write(index, path, hash);
                if let Some(old) = old {
                    self.discard(&old);
                }
                self.trace(format!(
                    "dev{index} user {what} {path} ({len} B, {})",
                    &hash.to_hex()[..8]
                ));
                self.touched(index, &[path]);
            }
            Err(error) => self.trace(format!("dev{index} user cannot write {path}: {error:?}")),
        }
    }
}

fn short_index(index: usize) -> String {
    if index == usize::MAX {
        "intruder".into()
    } else {
        format!("dev{index}")
    }
}

fn describe(msg: &Msg) -> String {
    match msg {
        Msg::DocSync { message, .. } => format!("sync message ({} B)", message.len()),
        Msg::ManifestRequest { id, .. } => format!("manifest request #{id}"),
        Msg::ManifestResponse { id, manifest } => {
            format!(
                "manifest #{id} ({})",
                if manifest.is_some() {
                    "found"
                } else {
                    "missing"
                }
            )
        }
        Msg::BlockRequest { id, hashes } => {
            format!("block request #{id} ({} blocks)", hashes.len())
        }
        Msg::Blocks { id, blocks } => format!(
            "blocks #{id} ({} of {})",
            blocks.iter().filter(|(_, b)| b.is_some()).count(),
            blocks.len()
        ),
    }
}
