//! The folder document: a folder's tree as one automerge document.
//!
//! Schema (version 1): the document's root map holds one key per path,
//! `"f/" + RelPath`, whose value is the [`Entry`] encoded with postcard as one automerge
//! bytes scalar. One write of a path is one operation, so concurrent writes to the same
//! path show up as automerge's conflicting values ([`FolderDocument::get_all`]): that is
//! how the engine detects a conflict. Deletes are entries with `deleted = true`
//! (tombstones), so that "edited here, deleted there" can be resolved. Keys are prefixed
//! (rather than nested in a `files` map) because two devices that each created a nested
//! map would produce two conflicting maps, hiding one device's files. Other prefixes are
//! reserved for the access list and folder settings.
//!
//! The automerge actor ID is the 32-byte device ID plus an 8-byte random suffix chosen
//! when a device's store is created (DESIGN.md): a device that lost its store must
//! never reuse sequence numbers its peers already hold.
//!
//! Everything read from the document may come from a peer: entries that fail to
//! decode or validate are reported, never trusted and never a panic.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};

use crate::access::{
    ACCESS_MESSAGE, AccessError, AccessList, AccessLog, AccessValue, AccessWrite, Role, access_key,
    key_device,
};
use crate::hash::ManifestHash;
use crate::identity::DeviceId;
use crate::manifest::Manifest;
use crate::path::{PathError, RelPath};

/// The hash naming one change of a document.
pub use automerge::ChangeHash;
/// Per-peer state of automerge's sync protocol (kept for the life of a connection).
pub use automerge::sync::State as SyncState;

/// Key prefix of file entries in the document's root map.
pub const ENTRY_PREFIX: &str = "f/";
/// Manifests of at most this many blocks are inlined in their entry (8 x 36 bytes): a
/// folder of small files then costs no manifest round trip per file.
pub const INLINE_MANIFEST_BLOCKS: usize = 8;
/// Changes walked back per value by [`FolderDocument::overtaken_rewrites`].
pub const MAX_HISTORY_STEPS: usize = 64;
/// Most concurrent values at one path for which [`FolderDocument::overtaken_rewrites`]
/// walks the history (beyond that, every value is kept).
pub const MAX_WALKED_VALUES: usize = 8;
pub use crate::actor::{ACTOR_SUFFIX_LEN, actor_device, actor_id};

/// What a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (recorded, never followed).
    Symlink,
}

/// The content of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Directories and tombstones.
    None,
    /// A file's manifest, inlined because it is small.
    Inline(Manifest),
    /// A file's manifest, by hash (fetched as a content-addressed object).
    Manifest(ManifestHash),
    /// A symlink's target, as text.
    Symlink(String),
}

impl Content {
    /// The content of a file with this manifest: inline if small, else by hash.
    pub fn for_manifest(manifest: &Manifest) -> Self {
        if manifest.blocks().len() <= INLINE_MANIFEST_BLOCKS {
            Content::Inline(manifest.clone())
        } else {
            Content::Manifest(manifest.hash())
        }
    }

    /// The manifest hash of a file's content.
    pub fn manifest_hash(&self) -> Option<ManifestHash> {
        match self {
            Content::Inline(manifest) => Some(manifest.hash()),
            Content::Manifest(hash) => Some(*hash),
            Content::None | Content::Symlink(_) => None,
        }
    }
}

/// One version of one path, as written by one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// A tombstone: the path was deleted.
    pub deleted: bool,
    /// Size in bytes (files), else 0.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Manifest or symlink target.
    pub content: Content,
    /// The device that wrote this version.
    pub author: DeviceId,
}

impl Entry {
    /// Canonical bytes stored in the document.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes and validates an entry from the document.
    pub fn decode(bytes: &[u8]) -> Result<Self, DocumentError> {
        let (entry, rest): (Entry, _) = postcard::take_from_bytes(bytes)
            .map_err(|error| DocumentError::Entry(error.to_string()))?;
        if !rest.is_empty() {
            return Err(DocumentError::Entry("trailing bytes".into()));
        }
        let consistent = match (&entry.kind, &entry.content) {
            (_, Content::None) => entry.deleted || entry.kind != EntryKind::File || entry.size == 0,
            (EntryKind::File, Content::Inline(manifest)) => manifest.size() == entry.size,
            (EntryKind::File, Content::Manifest(_)) => true,
            (EntryKind::Symlink, Content::Symlink(_)) => true,
            _ => false,
        };
        if !consistent {
            return Err(DocumentError::Entry(format!(
                "{:?} entry with inconsistent content",
                entry.kind
            )));
        }
        Ok(entry)
    }
}

/// Why reading or changing the document failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The saved bytes are not an automerge document.
    #[error("folder document is damaged: {0}")]
    Load(String),
    /// An automerge operation failed.
    #[error("folder document operation failed: {0}")]
    Automerge(String),
    /// An entry value is not a valid entry.
    #[error("invalid entry: {0}")]
    Entry(String),
    /// A key is not a valid path.
    #[error(transparent)]
    Path(#[from] PathError),
}

fn automerge_error(error: automerge::AutomergeError) -> DocumentError {
    DocumentError::Automerge(error.to_string())
}

/// What changed in the document: valid paths, and keys that are not valid paths.
#[derive(Debug, Default)]
pub struct ChangedPaths {
    /// Changed paths, sorted.
    pub paths: Vec<RelPath>,
    /// Entry keys that are not valid paths; never applied.
    pub rejected: Vec<String>,
}

/// One path's entry as read from the document.
#[derive(Debug)]
pub struct DocumentEntry {
    /// The path.
    pub path: RelPath,
    /// The entry automerge picks for the path (the same on every device), or why its
    /// value is invalid.
    pub entry: Result<Entry, DocumentError>,
    /// There are concurrent values for this path ([`FolderDocument::get_all`]).
    pub conflict: bool,
}

/// A folder's document. Wraps automerge so that only the schema above is written.
///
/// It also keeps the document's access history ([`AccessLog`]): every change's
/// author and dependencies, the access writes, and the void changes, whose writes
/// every read below leaves out (`crate::access`).
pub struct FolderDocument {
    doc: AutoCommit,
    access: AccessLog,
    /// Keys written by void changes: read without those writes.
    void_keys: std::collections::BTreeSet<String>,
    /// The paths void changes wrote, with their authors.
    void_paths: Vec<(DeviceId, RelPath)>,
}

impl std::fmt::Debug for FolderDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FolderDocument({} actor)", self.doc.get_actor())
    }
}

/// One of the concurrent values at a path (or why it does not decode), with the device
/// whose actor wrote it ([`FolderDocument::get_all_written`]).
pub type WrittenValue = (Result<Entry, DocumentError>, Option<DeviceId>);

/// A value at a key as [`FolderDocument`] reads it: its bytes (if bytes) and its
/// operation ID.
type RawValue = (Option<Vec<u8>>, automerge::ObjId);

/// The device whose actor wrote an operation.
fn writer_of(id: &automerge::ObjId) -> Option<DeviceId> {
    match id {
        automerge::ObjId::Id(_, actor, _) => actor_device(actor),
        automerge::ObjId::Root => None,
    }
}

/// automerge's order of operations (counter, then actor): the greatest is its pick.
fn op_order(id: &automerge::ObjId) -> (u64, Vec<u8>) {
    match id {
        automerge::ObjId::Id(counter, actor, _) => (*counter, actor.to_bytes().to_vec()),
        automerge::ObjId::Root => (0, Vec::new()),
    }
}

fn entry_key(path: &RelPath) -> String {
    format!("{ENTRY_PREFIX}{path}")
}

fn value_bytes<'a>(value: &'a Value<'_>) -> Option<&'a [u8]> {
    match value {
        Value::Scalar(scalar) => match scalar.as_ref() {
            ScalarValue::Bytes(bytes) => Some(bytes),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

impl FolderDocument {
    /// A new, empty document written by `actor`.
    pub fn new(actor: ActorId) -> Self {
        Self {
            doc: AutoCommit::new().with_actor(actor),
            access: AccessLog::default(),
            void_keys: Default::default(),
            void_paths: Vec::new(),
        }
    }

    /// Loads a saved document and then its incremental chunks, in order.
    pub fn load<'a>(
        saved: &[u8],
        increments: impl IntoIterator<Item = &'a [u8]>,
        actor: ActorId,
    ) -> Result<Self, DocumentError> {
        let mut doc = if saved.is_empty() {
            AutoCommit::new()
        } else {
            AutoCommit::load(saved).map_err(|error| DocumentError::Load(error.to_string()))?
        };
        for chunk in increments {
            doc.load_incremental(chunk)
                .map_err(|error| DocumentError::Load(error.to_string()))?;
        }
        let mut document = Self {
            doc: doc.with_actor(actor),
            access: AccessLog::default(),
            void_keys: Default::default(),
            void_paths: Vec::new(),
        };
        document.rebuild_access()?;
        Ok(document)
    }

    /// Builds the access log from the changes in the document (which were checked
    /// when they arrived: only changes labelled as access changes are decoded).
    fn rebuild_access(&mut self) -> Result<(), DocumentError> {
        let metas: Vec<(ChangeHash, ActorId, u64, Vec<ChangeHash>, bool)> = self
            .doc
            .get_changes_meta(&[])
            .into_iter()
            .map(|meta| {
                let access = meta.message.as_deref() == Some(ACCESS_MESSAGE);
                (
                    meta.hash,
                    meta.actor.into_owned(),
                    meta.seq,
                    meta.deps,
                    access,
                )
            })
            .collect();
        let mut waiting = metas;
        // Recorded in causal order; a change listed before a dependency waits a round.
        while !waiting.is_empty() {
            let before = waiting.len();
            let mut later = Vec::new();
            for (hash, actor, seq, deps, access) in waiting {
                // Checked when it arrived: what it writes is only read here.
                let writes = match actor_device(&actor) {
                    Some(author) if access => self
                        .checked_access_writes(&hash, author)
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                if !self.access.record(hash, &actor, seq, &deps, writes) {
                    later.push((hash, actor, seq, deps, access));
                }
            }
            if later.len() == before {
                return Err(DocumentError::Load(format!(
                    "{} changes whose dependencies or authors are missing",
                    later.len()
                )));
            }
            waiting = later;
        }
        self.access.settle();
        self.refresh_void_keys();
        Ok(())
    }

    /// The keys a change writes.
    fn keys_of(&mut self, hash: &ChangeHash) -> Vec<String> {
        let Some(change) = self.doc.get_change_by_hash(hash) else {
            return Vec::new();
        };
        change
            .decode()
            .operations
            .iter()
            .filter_map(|op| match &op.key {
                automerge::legacy::Key::Map(key) => Some(key.to_string()),
                automerge::legacy::Key::Seq(_) => None,
            })
            .collect()
    }

    fn refresh_void_keys(&mut self) {
        let void: Vec<ChangeHash> = self.access.void().iter().copied().collect();
        let mut keys = std::collections::BTreeSet::new();
        let mut by = Vec::new();
        for change in void {
            let author = self
                .access
                .causality()
                .actor(&change)
                .and_then(actor_device);
            for key in self.keys_of(&change) {
                if let (Some(author), Some(path)) = (author, key.strip_prefix(ENTRY_PREFIX))
                    && let Ok(path) = RelPath::new(path)
                {
                    by.push((author, path));
                }
                keys.insert(key);
            }
        }
        self.void_keys = keys;
        self.void_paths = by;
    }

    /// The paths void changes by `device` wrote.
    pub fn void_paths_by(&self, device: &DeviceId) -> Vec<RelPath> {
        self.void_paths
            .iter()
            .filter(|(author, _)| author == device)
            .map(|(_, path)| path.clone())
            .collect()
    }

    /// Checks the changes a sync message added (`added`, from [`Self::changes_since`],
    /// in causal order) against the access list: each must write only what the schema
    /// allows, and its author's role at its dependencies must allow every write
    /// (`crate::access`). On success, the void set is computed again and the paths
    /// whose values it changed are returned, to be planned. On an error the caller
    /// must drop the document (reload it from its store): part of the message is in it.
    /// `enforce` false skips the checks (the simulation's sabotage shows that its
    /// checker notices).
    pub fn admit(
        &mut self,
        added: &[(ChangeHash, ActorId)],
        founder: &DeviceId,
        enforce: bool,
    ) -> Result<Vec<RelPath>, AccessError> {
        for (hash, actor) in added {
            let author = actor_device(actor).ok_or(AccessError::NoAuthor { change: *hash })?;
            let meta = self
                .doc
                .get_change_meta_by_hash(hash)
                .ok_or(AccessError::NoAuthor { change: *hash })?;
            let (seq, deps) = (meta.seq, meta.deps.clone());
            let is_access = meta.message.as_deref() == Some(ACCESS_MESSAGE);
            // A change of files is not decoded: it needs `edit` whatever it writes
            // (keys outside the schema are never read; an access entry is read only
            // from a change labelled as one, which is decoded and checked op by op).
            let writes_files = !is_access;
            let mut writes = Vec::new();
            if is_access {
                writes = self.checked_access_writes(hash, author)?;
            }
            if !enforce {
                writes.retain(|_| is_access);
            }
            if !self.access.record(*hash, actor, seq, &deps, writes) {
                return Err(AccessError::NoAuthor { change: *hash });
            }
            if enforce {
                self.access.check(hash, founder, writes_files)?;
            }
        }
        let changed = self.access.settle();
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let mut paths = std::collections::BTreeSet::new();
        for change in changed {
            for key in self.keys_of(&change) {
                if let Some(path) = key.strip_prefix(ENTRY_PREFIX)
                    && let Ok(path) = RelPath::new(path)
                {
                    paths.insert(path);
                }
            }
        }
        self.refresh_void_keys();
        Ok(paths.into_iter().collect())
    }

    /// The writes of an access change, each checked to be an access value at an
    /// access key of the root map (a delete of another value there, how automerge
    /// resolves concurrent values, writes no role).
    fn checked_access_writes(
        &mut self,
        hash: &ChangeHash,
        author: DeviceId,
    ) -> Result<Vec<AccessWrite>, AccessError> {
        let schema = |what: String| AccessError::Schema {
            change: *hash,
            author,
            what,
        };
        let change = self
            .doc
            .get_change_by_hash(hash)
            .ok_or(AccessError::NoAuthor { change: *hash })?;
        let mut writes = Vec::new();
        for op in change.decode().operations {
            let automerge::legacy::Key::Map(key) = &op.key else {
                return Err(schema("a list element in an access change".into()));
            };
            let target =
                key_device(key).ok_or_else(|| schema(format!("{key:?} in an access change")))?;
            match (&op.obj, &op.action, op.insert) {
                (
                    automerge::legacy::ObjectId::Root,
                    automerge::legacy::OpType::Put(ScalarValue::Bytes(bytes)),
                    false,
                ) => {
                    let value = AccessValue::decode(bytes)
                        .ok_or_else(|| schema(format!("an invalid access value at {key:?}")))?;
                    writes.push(AccessWrite {
                        target,
                        role: value.role,
                    });
                }
                (automerge::legacy::ObjectId::Root, automerge::legacy::OpType::Delete, false) => {}
                (obj, action, _) => {
                    return Err(schema(format!(
                        "an operation other than a value at {key:?} ({obj:?}, {action:?})"
                    )));
                }
            }
        }
        Ok(writes)
    }

    /// The access list now (void changes left out).
    pub fn access_list(&self) -> AccessList {
        self.access.current()
    }

    /// True if `change` is void: its writes are ignored (`crate::access`).
    pub fn is_void(&self, change: &ChangeHash) -> bool {
        self.access.is_void(change)
    }

    /// Sets `device`'s role (`None`: removes it) in one change of its own, committed
    /// at `time_ms`. The caller checks first that this device may ([`crate::access::may_set`]);
    /// receivers refuse a change it may not make. Pending file writes are committed
    /// first, as a change of their own.
    pub fn set_access(
        &mut self,
        device: &DeviceId,
        role: Option<Role>,
        time_ms: i64,
    ) -> Result<(), DocumentError> {
        if self.doc.pending_ops() > 0 {
            self.commit(time_ms, "local changes");
        }
        self.doc
            .put(
                automerge::ROOT,
                access_key(device),
                AccessValue { role }.encode(),
            )
            .map_err(automerge_error)?;
        let hash = self.doc.commit_with(
            CommitOptions::default()
                .with_time(time_ms / 1000)
                .with_message(ACCESS_MESSAGE),
        );
        if let Some(hash) = hash {
            self.record_local(
                hash,
                vec![AccessWrite {
                    target: *device,
                    role,
                }],
            );
            self.access.settle();
            self.refresh_void_keys();
        }
        Ok(())
    }

    /// Records a change this device just committed in the access log.
    fn record_local(&mut self, hash: ChangeHash, writes: Vec<AccessWrite>) {
        let Some(meta) = self.doc.get_change_meta_by_hash(&hash) else {
            return;
        };
        let (seq, deps, actor) = (meta.seq, meta.deps.clone(), meta.actor.into_owned());
        self.access.record(hash, &actor, seq, &deps, writes);
    }

    /// Writes `entry` at `path` (one operation).
    pub fn put(&mut self, path: &RelPath, entry: &Entry) -> Result<(), DocumentError> {
        let key = entry_key(path);
        let bytes = entry.encode();
        if self.void_keys.contains(&key) {
            // automerge writes nothing when the value it shows is already these bytes,
            // but a void change's value is not read: writing it again must make a new
            // operation. An empty value first (it decodes as no entry, and is
            // overwritten in this same change) makes the real one a write of its own.
            let shown = self
                .doc
                .get(automerge::ROOT, key.as_str())
                .map_err(automerge_error)?;
            if shown.as_ref().and_then(|(value, _)| value_bytes(value)) == Some(bytes.as_slice()) {
                self.doc
                    .put(automerge::ROOT, key.as_str(), Vec::<u8>::new())
                    .map_err(automerge_error)?;
            }
        }
        self.doc
            .put(automerge::ROOT, key, bytes)
            .map_err(automerge_error)
    }

    /// The entry automerge picks for `path` (deterministic on every device).
    pub fn get(&self, path: &RelPath) -> Result<Option<Entry>, DocumentError> {
        let key = entry_key(path);
        if self.void_keys.contains(&key) {
            return match self.values(&key)?.pop() {
                None => Ok(None),
                Some((bytes, _)) => bytes
                    .ok_or_else(|| DocumentError::Entry("not a bytes value".into()))
                    .and_then(|bytes| Entry::decode(&bytes))
                    .map(Some),
            };
        }
        let value = self
            .doc
            .get(automerge::ROOT, key)
            .map_err(automerge_error)?;
        match value {
            None => Ok(None),
            Some((value, _)) => {
                let bytes = value_bytes(&value)
                    .ok_or_else(|| DocumentError::Entry("not a bytes value".into()))?;
                Entry::decode(bytes).map(Some)
            }
        }
    }

    /// Every concurrent value at `path`; more than one means a conflict. Values that do
    /// not decode are returned as errors so the caller can report them.
    pub fn get_all(
        &self,
        path: &RelPath,
    ) -> Result<Vec<Result<Entry, DocumentError>>, DocumentError> {
        Ok(self
            .get_all_written(path)?
            .into_iter()
            .map(|(entry, _)| entry)
            .collect())
    }

    /// [`Self::get_all`], each value with the device whose actor wrote it into the
    /// document (`None` for an actor outside Weft's layout). The writer differs from
    /// the entry's author when a device resolving a conflict wrote another device's
    /// version again. Received changes are checked to be signed by the device their
    /// actor names, so the writer is authenticated.
    pub fn get_all_written(&self, path: &RelPath) -> Result<Vec<WrittenValue>, DocumentError> {
        Ok(self
            .values(&entry_key(path))?
            .iter()
            .map(|(bytes, id)| {
                let entry = bytes
                    .as_deref()
                    .ok_or_else(|| DocumentError::Entry("not a bytes value".into()))
                    .and_then(Entry::decode);
                (entry, writer_of(id))
            })
            .collect())
    }

    /// The current values at `key` (their bytes, if bytes) with their operation IDs,
    /// void changes' writes left out: a void write shows what it wrote over instead,
    /// unless a kept value had seen that; a path only void changes ever wrote reads as
    /// a tombstone of the first of them.
    fn values(&self, key: &str) -> Result<Vec<RawValue>, DocumentError> {
        let owned = |(value, id): (Value<'_>, automerge::ObjId)| {
            (value_bytes(&value).map(<[u8]>::to_vec), id)
        };
        let current: Vec<_> = self
            .doc
            .get_all(automerge::ROOT, key)
            .map_err(automerge_error)?
            .into_iter()
            .map(owned)
            .collect();
        if !self.void_keys.contains(key) {
            return Ok(current);
        }
        let mut stack = current;
        let mut visited = std::collections::BTreeSet::new();
        let mut kept: Vec<(Option<Vec<u8>>, automerge::ObjId, ChangeHash)> = Vec::new();
        let mut first_void = None;
        while let Some((bytes, id)) = stack.pop() {
            if visited.len() >= MAX_HISTORY_STEPS || !visited.insert(id.to_string()) {
                continue;
            }
            let Some(change) = self.doc.hash_for_opid(&id) else {
                continue;
            };
            if !self.access.is_void(&change) {
                kept.push((bytes, id, change));
                continue;
            }
            if first_void.is_none() {
                first_void = Some((bytes.clone(), id.clone()));
            }
            let deps = self.access.deps(&change).unwrap_or_default();
            let before = self
                .doc
                .get_all_at(automerge::ROOT, key, deps)
                .map_err(automerge_error)?;
            stack.extend(before.into_iter().map(owned));
        }
        let causality = self.access.causality();
        let seen: Vec<bool> = kept
            .iter()
            .map(|(_, _, change)| {
                kept.iter()
                    .any(|(_, _, other)| other != change && causality.saw(other, change))
            })
            .collect();
        let mut values: Vec<_> = kept
            .into_iter()
            .zip(seen)
            .filter(|(_, seen)| !seen)
            .map(|((bytes, id, _), _)| (bytes, id))
            .collect();
        if values.is_empty()
            && let Some((Some(bytes), id)) = first_void
            && let Ok(mut entry) = Entry::decode(&bytes)
        {
            entry.deleted = true;
            entry.size = 0;
            entry.content = Content::None;
            values.push((Some(entry.encode()), id));
        }
        // automerge's order: by operation ID, its pick last.
        values.sort_by_key(|(_, id)| op_order(id));
        Ok(values)
    }

    /// For each value of [`Self::get_all_written`] (same order): true if it is a rewrite
    /// (written by a device other than its author, as a device resolving a conflict
    /// writes the winner again) of a version that the writer of another current value,
    /// a different version, had already seen at this path and written over. Such a rewrite is older than that
    /// value in every sense but its mtime: its version was replaced, by a device that
    /// saw it, before the rewrite arrived (simulation seed 169).
    ///
    /// Walks back through the writes at `path` behind each other value: the values
    /// its change's dependencies held there, then theirs, at most
    /// [`MAX_HISTORY_STEPS`] changes per value (beyond that: not seen). Only paths with
    /// concurrent values and a rewrite among them pay for the walk.
    pub fn overtaken_rewrites(&self, path: &RelPath) -> Result<Vec<bool>, DocumentError> {
        let key = entry_key(path);
        let values = self.values(&key)?;
        let mut overtaken = vec![false; values.len()];
        // More concurrent values than honest devices make: no walk (a hostile device
        // could mint values to make every plan of the path walk for each pair), and
        // every value is kept, which loses nothing.
        if values.len() < 2 || values.len() > MAX_WALKED_VALUES {
            return Ok(overtaken);
        }
        for (i, (value, id)) in values.iter().enumerate() {
            let Some(bytes) = value.as_deref() else {
                continue;
            };
            let writer = writer_of(id);
            let is_rewrite = match Entry::decode(bytes) {
                Ok(entry) => writer != Some(entry.author),
                Err(_) => false,
            };
            if !is_rewrite {
                continue;
            }
            // Another write of this same version re-asserts it; it overtakes nothing.
            // Only a value that takes part in resolution (it decodes) can hide one.
            overtaken[i] = values.iter().enumerate().any(|(j, (other, other_id))| {
                j != i
                    && other
                        .as_deref()
                        .is_some_and(|other| other != bytes && Entry::decode(other).is_ok())
                    && self.seen_behind(&key, other_id, bytes)
            });
        }
        Ok(overtaken)
    }

    /// True if `version` (an entry's bytes) was a value at `key` in the history behind
    /// the write `from`: in the values its change's dependencies held there, or theirs,
    /// and so on back (at most [`MAX_HISTORY_STEPS`] changes).
    fn seen_behind(&self, key: &str, from: &automerge::ObjId, version: &[u8]) -> bool {
        let mut queue = std::collections::VecDeque::from([from.clone()]);
        let mut visited: std::collections::BTreeSet<automerge::ChangeHash> = Default::default();
        while let Some(write) = queue.pop_front() {
            let Some(change) = self.doc.hash_for_opid(&write) else {
                continue;
            };
            if visited.len() >= MAX_HISTORY_STEPS || !visited.insert(change) {
                continue;
            }
            // The change's dependencies: the heads its writer had when writing.
            let Ok(bundle) = self.doc.bundle([change]) else {
                continue;
            };
            let Ok(before) = self.doc.get_all_at(automerge::ROOT, key, bundle.deps()) else {
                continue;
            };
            for (value, id) in before {
                if value_bytes(&value) == Some(version) {
                    return true;
                }
                queue.push_back(id);
            }
        }
        false
    }

    /// Every path in the document with its current entry, in path order. Keys outside
    /// the schema are skipped; invalid paths and entries are returned as errors.
    pub fn entries(&self) -> impl Iterator<Item = Result<DocumentEntry, DocumentError>> + '_ {
        let start = ENTRY_PREFIX.to_owned();
        // The prefix "f/" is followed by "f0" in byte order.
        let end = "f0".to_owned();
        self.doc.map_range(automerge::ROOT, start..end).map(|item| {
            let path = RelPath::new(&item.key[ENTRY_PREFIX.len()..])?;
            if self.void_keys.contains(item.key.as_ref()) {
                let values = self.values(&item.key)?;
                let conflict = values.len() > 1;
                let entry = match values.last() {
                    Some((Some(bytes), _)) => Entry::decode(bytes),
                    _ => Err(DocumentError::Entry("not a bytes value".into())),
                };
                return Ok(DocumentEntry {
                    path,
                    entry,
                    conflict,
                });
            }
            let entry = match &item.value {
                automerge::ValueRef::Scalar(automerge::ScalarValueRef::Bytes(bytes)) => {
                    Entry::decode(bytes)
                }
                _ => Err(DocumentError::Entry("not a bytes value".into())),
            };
            Ok(DocumentEntry {
                path,
                entry,
                conflict: item.conflict,
            })
        })
    }

    /// Number of paths (including tombstones).
    pub fn len(&self) -> usize {
        self.doc
            .map_range(automerge::ROOT, ENTRY_PREFIX.to_owned().."f0".to_owned())
            .count()
    }

    /// True if the document has no paths.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Commits pending file writes as one change, stamped with `time_ms` (ms since
    /// epoch). (Access changes are made by [`Self::set_access`].)
    pub fn commit(&mut self, time_ms: i64, message: &str) {
        let message = if message == ACCESS_MESSAGE {
            "local changes"
        } else {
            message
        };
        let hash = self.doc.commit_with(
            CommitOptions::default()
                .with_time(time_ms / 1000)
                .with_message(message),
        );
        if let Some(hash) = hash {
            self.record_local(hash, Vec::new());
        }
    }

    /// The whole document, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// The changes since the last `save` or `save_incremental` (empty if none).
    pub fn save_incremental(&mut self) -> Vec<u8> {
        self.doc.save_incremental()
    }

    /// Every version ever written at each path, in the document's change order: the
    /// raw material of version history. Values that do not decode are skipped.
    pub fn history(&mut self) -> std::collections::BTreeMap<String, Vec<Entry>> {
        let mut versions: std::collections::BTreeMap<String, Vec<Entry>> = Default::default();
        for change in self.doc.get_changes(&[]) {
            if self.access.is_void(&change.hash()) {
                continue;
            }
            for op in change.decode().operations {
                let automerge::legacy::Key::Map(key) = &op.key else {
                    continue;
                };
                let Some(path) = key.strip_prefix(ENTRY_PREFIX) else {
                    continue;
                };
                if let automerge::legacy::OpType::Put(ScalarValue::Bytes(bytes)) = &op.action
                    && let Ok(entry) = Entry::decode(bytes)
                {
                    versions.entry(path.to_owned()).or_default().push(entry);
                }
            }
        }
        versions
    }

    /// The document's current heads.
    pub fn heads(&mut self) -> Vec<automerge::ChangeHash> {
        self.doc.get_heads()
    }

    /// Paths whose value changed between `before` (earlier heads) and now, and the
    /// entry keys that changed but are not valid paths (a broken or hostile peer).
    pub fn changed_paths(&mut self, before: &[automerge::ChangeHash]) -> ChangedPaths {
        let after = self.doc.get_heads();
        let mut changed = ChangedPaths::default();
        if after.as_slice() == before {
            return changed;
        }
        for patch in self.doc.diff(before, &after) {
            let key = match patch.action {
                automerge::PatchAction::PutMap { key, .. }
                | automerge::PatchAction::DeleteMap { key } => key,
                _ => continue,
            };
            let Some(path) = key.strip_prefix(ENTRY_PREFIX) else {
                continue;
            };
            match RelPath::new(path) {
                Ok(path) => changed.paths.push(path),
                Err(_) => changed.rejected.push(key),
            }
        }
        changed.paths.sort();
        changed.paths.dedup();
        changed
    }

    /// The next sync message for a peer, if it lacks anything (automerge's sync
    /// protocol; `state` is kept per peer for the life of the connection).
    pub fn generate_sync_message(&mut self, state: &mut automerge::sync::State) -> Option<Vec<u8>> {
        use automerge::sync::SyncDoc;
        self.doc
            .sync()
            .generate_sync_message(state)
            .map(automerge::sync::Message::encode)
    }

    /// Like [`Self::generate_sync_message`], with the hashes of the changes the message
    /// carries (their signatures go with it).
    pub fn generate_sync_message_with_changes(
        &mut self,
        state: &mut automerge::sync::State,
    ) -> Option<(Vec<u8>, Vec<automerge::ChangeHash>)> {
        // automerge records every change it puts in a message in `sent_hashes`, and
        // never puts one that is already there.
        let sent_before = state.sent_hashes.clone();
        let message = self.generate_sync_message(state)?;
        let changes = state
            .sent_hashes
            .difference(&sent_before)
            .copied()
            .collect();
        Some((message, changes))
    }

    /// The changes in the document that `heads` does not include (after receiving a
    /// sync message: what it added), with their actors.
    pub fn changes_since(
        &mut self,
        heads: &[automerge::ChangeHash],
    ) -> Vec<(automerge::ChangeHash, ActorId)> {
        self.doc
            .get_changes(heads)
            .iter()
            .map(|change| (change.hash(), change.actor_id().clone()))
            .collect()
    }

    /// The actor of a change in the document.
    pub fn change_actor(&mut self, change: &automerge::ChangeHash) -> Option<ActorId> {
        self.doc
            .get_change_by_hash(change)
            .map(|change| change.actor_id().clone())
    }

    /// Applies a sync message from a peer. The changes it adds are in the access log
    /// (and so in [`Self::access_list`]) once [`Self::admit`] has checked them, or once
    /// the document is loaded again.
    pub fn receive_sync_message(
        &mut self,
        state: &mut automerge::sync::State,
        bytes: &[u8],
    ) -> Result<(), DocumentError> {
        use automerge::sync::SyncDoc;
        let message = automerge::sync::Message::decode(bytes)
            .map_err(|error| DocumentError::Load(format!("bad sync message: {error}")))?;
        self.doc
            .sync()
            .receive_sync_message(state, message)
            .map_err(automerge_error)
    }

    /// The automerge document, for the sync protocol (node side).
    pub fn automerge(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::BlockHash;
    use crate::identity::DeviceKey;
    use crate::manifest::BlockRef;

    fn device(seed: u8) -> DeviceId {
        DeviceKey::from_secret_bytes([seed; 32]).device_id()
    }

    fn file(author: DeviceId, data: &[u8]) -> Entry {
        let manifest = Manifest::from_blocks(vec![BlockRef {
            hash: BlockHash::of(data),
            len: data.len() as u32,
        }])
        .unwrap();
        Entry {
            kind: EntryKind::File,
            deleted: false,
            size: data.len() as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            mode: 0o644,
            content: Content::for_manifest(&manifest),
            author,
        }
    }

    fn path(text: &str) -> RelPath {
        RelPath::new(text).unwrap()
    }

    /// A document of `device` holding everything in `saved`.
    fn merged(device: u8, saved: &[&[u8]]) -> FolderDocument {
        FolderDocument::load(
            &[],
            saved.iter().copied(),
            actor_id(&self::device(device), [device; 8]),
        )
        .unwrap()
    }

    #[test]
    fn a_rewrite_is_overtaken_only_by_a_writer_that_had_seen_its_version() {
        let (x, y, r, d, e) = (device(1), device(2), device(3), device(4), device(5));
        let at = path("notes");
        // X and Y edit concurrently; R sees both and resolves by writing X's again.
        let v = file(x, b"x's version");
        let w = file(y, b"y's version");
        let mut on_x = merged(1, &[]);
        on_x.put(&at, &v).unwrap();
        on_x.commit(0, "x");
        let mut on_y = merged(2, &[]);
        on_y.put(&at, &w).unwrap();
        on_y.commit(0, "y");
        let (x_saved, y_saved) = (on_x.save(), on_y.save());
        let mut on_r = merged(3, &[&x_saved, &y_saved]);
        assert_eq!(on_r.get_all(&at).unwrap().len(), 2);
        // (Automerge keeps the original operation when a write repeats the value it
        // shows; writing Y's first makes R's write of X's version a new operation, as
        // it is whenever the engine's winner is not automerge's pick.)
        on_r.put(&at, &w).unwrap();
        on_r.put(&at, &v).unwrap();
        on_r.commit(0, "r resolves");
        let written = on_r.get_all_written(&at).unwrap();
        assert_eq!(written.len(), 1);
        assert_eq!(
            written[0].1,
            Some(r),
            "R's resolution is a write of its own"
        );
        let r_saved = on_r.save();
        // D saw the same conflict and its user replaced the file: a new edit.
        let mut on_d = merged(4, &[&x_saved, &y_saved]);
        let u = file(d, b"d's edit");
        on_d.put(&at, &u).unwrap();
        on_d.commit(0, "d edits");
        // E never saw X's version: its edit is concurrent with it.
        let mut on_e = merged(5, &[&y_saved]);
        let z = file(e, b"e's edit");
        on_e.put(&at, &z).unwrap();
        on_e.commit(0, "e edits");
        let (d_saved, e_saved) = (on_d.save(), on_e.save());

        let sorted = |mut pairs: Vec<(Entry, bool)>| {
            pairs.sort_by_key(|(entry, _)| entry.author);
            pairs
        };
        let flags = |doc: &FolderDocument| {
            let mut pairs: Vec<(Entry, bool)> = doc
                .get_all_written(&at)
                .unwrap()
                .into_iter()
                .map(|(entry, _)| entry.unwrap())
                .zip(doc.overtaken_rewrites(&at).unwrap())
                .collect();
            pairs.sort_by_key(|(entry, _)| entry.author);
            pairs
        };
        // R's rewrite beside D's edit: D had seen X's version, so the rewrite is older.
        let with_d = merged(6, &[&r_saved, &d_saved]);
        assert_eq!(flags(&with_d), sorted(vec![(v.clone(), true), (u, false)]));
        // Beside E's edit it is a real conflict: E never saw X's version.
        let with_e = merged(6, &[&r_saved, &e_saved]);
        assert_eq!(flags(&with_e), sorted(vec![(v.clone(), false), (z, false)]));
        // Two devices writing the same version again overtake nothing of each other.
        let mut on_y_resolves = merged(2, &[&x_saved, &y_saved]);
        on_y_resolves.put(&at, &w).unwrap();
        on_y_resolves.put(&at, &v).unwrap();
        on_y_resolves.commit(0, "y resolves too");
        let both = merged(6, &[&r_saved, &on_y_resolves.save()]);
        let pairs = flags(&both);
        assert_eq!(pairs.len(), 2, "{pairs:?}");
        assert!(
            pairs
                .iter()
                .all(|(entry, overtaken)| entry == &v && !overtaken)
        );
    }

    /// Merges everything `from` holds into `to` and admits it, as a receiver does.
    fn receive(
        to: &mut FolderDocument,
        from: &mut FolderDocument,
        founder: &DeviceId,
    ) -> Result<Vec<RelPath>, AccessError> {
        let before = to.heads();
        to.automerge().merge(from.automerge()).unwrap();
        let added = to.changes_since(&before);
        to.admit(&added, founder, true)
    }

    #[test]
    fn changes_are_admitted_by_their_authors_role_and_void_writes_are_not_read() {
        let (f, x, v) = (device(1), device(2), device(3));
        let mut on_f = FolderDocument::new(actor_id(&f, [1; 8]));
        on_f.set_access(&f, Some(Role::Owner), 1_000).unwrap();
        on_f.set_access(&x, Some(Role::Edit), 1_000).unwrap();
        on_f.set_access(&v, Some(Role::View), 1_000).unwrap();
        on_f.put(&path("a"), &file(f, b"one")).unwrap();
        on_f.commit(1_000, "scan");
        let mut on_x = FolderDocument::new(actor_id(&x, [2; 8]));
        assert_eq!(receive(&mut on_x, &mut on_f, &f), Ok(vec![]));
        assert_eq!(on_x.access_list().role(&x), Some(Role::Edit));
        // A history founded by another device is refused.
        let mut elsewhere = FolderDocument::new(actor_id(&x, [3; 8]));
        assert!(receive(&mut elsewhere, &mut on_f, &x).is_err());
        // A view device's edit is refused wherever it arrives.
        let mut on_v = FolderDocument::new(actor_id(&v, [4; 8]));
        receive(&mut on_v, &mut on_f, &f).unwrap();
        on_v.put(&path("a"), &file(v, b"vandal")).unwrap();
        on_v.commit(2_000, "edit");
        let mut copy = merged(9, &[&on_f.save()]);
        assert!(matches!(
            receive(&mut copy, &mut on_v, &f),
            Err(AccessError::CannotEdit {
                role: Some(Role::View),
                ..
            })
        ));
        // X edits `a` and makes `b` while F, not having seen it, removes X: accepted
        // (X could edit where it wrote), then void: F reads its own `a`, and `b` as a
        // tombstone.
        on_x.put(&path("a"), &file(x, b"two")).unwrap();
        on_x.put(&path("b"), &file(x, b"new")).unwrap();
        on_x.commit(3_000, "edit");
        on_f.set_access(&x, None, 3_000).unwrap();
        let replan = receive(&mut on_f, &mut on_x, &f).unwrap();
        assert_eq!(replan, vec![path("a"), path("b")]);
        assert_eq!(on_f.get(&path("a")).unwrap(), Some(file(f, b"one")));
        let written = on_f.get_all_written(&path("a")).unwrap();
        assert_eq!(written.len(), 1);
        let b = on_f.get(&path("b")).unwrap().unwrap();
        assert!(b.deleted && b.author == x);
        assert_eq!(on_f.history()["a"], vec![file(f, b"one")]);
        let listed: Vec<_> = on_f
            .entries()
            .map(|e| e.unwrap())
            .map(|e| (e.path.to_string(), e.entry.unwrap().deleted))
            .collect();
        assert_eq!(listed, vec![("a".into(), false), ("b".into(), true)]);
        // The same on a device that saw it in the other order, and after a reload.
        let mut on_v2 = FolderDocument::new(actor_id(&v, [5; 8]));
        receive(&mut on_v2, &mut on_x, &f).unwrap();
        assert_eq!(on_v2.get(&path("a")).unwrap(), Some(file(x, b"two")));
        receive(&mut on_v2, &mut on_f, &f).unwrap();
        assert_eq!(on_v2.get(&path("a")).unwrap(), Some(file(f, b"one")));
        let reloaded = merged(8, &[&on_v2.save()]);
        assert_eq!(reloaded.get(&path("a")).unwrap(), Some(file(f, b"one")));
        assert_eq!(reloaded.access_list().role(&x), None);
        // Written again by a device that may write, the void version is read again.
        let mut again = merged(6, &[&on_f.save()]);
        again.put(&path("b"), &file(x, b"new")).unwrap();
        again.commit(5_000, "republish");
        assert_eq!(again.get(&path("b")).unwrap(), Some(file(x, b"new")));
        // X's edit after it saw its removal is refused.
        receive(&mut on_x, &mut on_f, &f).unwrap();
        on_x.put(&path("c"), &file(x, b"late")).unwrap();
        on_x.commit(4_000, "edit");
        let mut copy = merged(7, &[&on_f.save()]);
        assert!(matches!(
            receive(&mut copy, &mut on_x, &f),
            Err(AccessError::CannotEdit { role: None, .. })
        ));
    }

    #[test]
    fn put_get_save_load_round_trip() {
        let a = device(1);
        let mut doc = FolderDocument::new(actor_id(&a, [1; 8]));
        doc.put(&path("docs/readme.txt"), &file(a, b"hello"))
            .unwrap();
        doc.put(&path("z"), &file(a, b"z")).unwrap();
        doc.commit(1000, "scan");
        let saved = doc.save();
        doc.put(&path("docs/readme.txt"), &file(a, b"hello again"))
            .unwrap();
        doc.commit(2000, "edit");
        let increment = doc.save_incremental();
        assert!(!increment.is_empty());
        let loaded =
            FolderDocument::load(&saved, [increment.as_slice()], actor_id(&a, [2; 8])).unwrap();
        assert_eq!(
            loaded.get(&path("docs/readme.txt")).unwrap(),
            Some(file(a, b"hello again"))
        );
        let paths: Vec<String> = loaded
            .entries()
            .map(|e| e.unwrap().path.to_string())
            .collect();
        assert_eq!(paths, vec!["docs/readme.txt", "z"]);
        assert_eq!(loaded.len(), 2);
        let mut loaded = loaded;
        let history = loaded.history();
        assert_eq!(history["docs/readme.txt"].len(), 2);
        assert_eq!(history["z"], vec![file(a, b"z")]);
        assert_eq!(actor_device(&actor_id(&a, [3; 8])), Some(a));
    }

    #[test]
    fn concurrent_writes_are_a_conflict_on_both_sides() {
        let (a, b) = (device(1), device(2));
        let mut doc_a = FolderDocument::new(actor_id(&a, [0; 8]));
        let mut doc_b = FolderDocument::new(actor_id(&b, [0; 8]));
        doc_a.put(&path("f"), &file(a, b"from a")).unwrap();
        doc_a.commit(1, "a");
        doc_b.put(&path("f"), &file(b, b"from b")).unwrap();
        doc_b.commit(1, "b");
        doc_a.automerge().merge(doc_b.automerge()).unwrap();
        doc_b.automerge().merge(doc_a.automerge()).unwrap();
        for doc in [&doc_a, &doc_b] {
            let all = doc.get_all(&path("f")).unwrap();
            assert_eq!(all.len(), 2);
            assert!(doc.entries().next().unwrap().unwrap().conflict);
        }
        // Both sides agree on automerge's pick.
        assert_eq!(
            doc_a.get(&path("f")).unwrap(),
            doc_b.get(&path("f")).unwrap()
        );
    }

    /// Runs automerge's sync protocol between two documents until neither has anything
    /// to send; returns the changes `a` said its messages carried.
    fn sync_until_idle(
        doc_a: &mut FolderDocument,
        doc_b: &mut FolderDocument,
    ) -> std::collections::BTreeSet<ChangeHash> {
        let (mut state_a, mut state_b) =
            (automerge::sync::State::new(), automerge::sync::State::new());
        let mut carried = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let to_b = doc_a.generate_sync_message_with_changes(&mut state_a);
            if let Some((message, changes)) = &to_b {
                carried.extend(changes.iter().copied());
                doc_b.receive_sync_message(&mut state_b, message).unwrap();
            }
            let to_a = doc_b.generate_sync_message(&mut state_b);
            if let Some(message) = &to_a {
                doc_a.receive_sync_message(&mut state_a, message).unwrap();
            }
            if to_a.is_none() && to_b.is_none() {
                break;
            }
        }
        carried
    }

    #[test]
    fn sync_protocol_converges_and_reports_changed_paths() {
        let (a, b) = (device(1), device(2));
        let mut doc_a = FolderDocument::new(actor_id(&a, [0; 8]));
        let mut doc_b = FolderDocument::new(actor_id(&b, [0; 8]));
        doc_a.put(&path("x"), &file(a, b"x")).unwrap();
        doc_a.put(&path("y/z"), &file(a, b"z")).unwrap();
        doc_a.commit(1, "a");
        let before = doc_b.heads();
        sync_until_idle(&mut doc_a, &mut doc_b);
        assert_eq!(doc_b.get(&path("y/z")).unwrap(), Some(file(a, b"z")));
        let changed = doc_b.changed_paths(&before);
        let paths: Vec<String> = changed.paths.iter().map(|p| p.to_string()).collect();
        assert_eq!(paths, vec!["x", "y/z"]);
        assert!(changed.rejected.is_empty());
        assert!(
            doc_b
                .receive_sync_message(&mut automerge::sync::State::new(), b"garbage")
                .is_err()
        );
    }

    #[test]
    fn sync_messages_name_the_changes_they_carry() {
        let (a, b) = (device(1), device(2));
        let mut doc_a = FolderDocument::new(actor_id(&a, [0; 8]));
        let mut doc_b = FolderDocument::new(actor_id(&b, [0; 8]));
        for name in ["one", "two", "three"] {
            doc_a.put(&path(name), &file(a, name.as_bytes())).unwrap();
            doc_a.commit(1, name);
        }
        let all: std::collections::BTreeSet<_> = doc_a
            .changes_since(&[])
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        assert_eq!(all.len(), 3);
        let before = doc_b.heads();
        let carried = sync_until_idle(&mut doc_a, &mut doc_b);
        assert_eq!(carried, all);
        let received = doc_b.changes_since(&before);
        assert!(
            received
                .iter()
                .all(|(_, actor)| actor_device(actor) == Some(a))
        );
        let received: std::collections::BTreeSet<_> =
            received.into_iter().map(|(h, _)| h).collect();
        assert_eq!(received, all);
        let first = *all.iter().next().unwrap();
        assert_eq!(doc_b.change_actor(&first), Some(actor_id(&a, [0; 8])));
        let now = doc_b.heads();
        assert!(doc_b.changes_since(&now).is_empty());
    }

    #[test]
    fn hostile_values_are_reported_not_trusted() {
        let a = device(1);
        let mut doc = FolderDocument::new(actor_id(&a, [0; 8]));
        // A peer writes garbage, a bad path, and an entry whose inline manifest lies.
        doc.automerge()
            .put(automerge::ROOT, "f/ok", vec![1u8, 2, 3])
            .unwrap();
        doc.automerge()
            .put(automerge::ROOT, "f/../escape", file(a, b"x").encode())
            .unwrap();
        let mut lying = file(a, b"abc");
        lying.size = 99;
        doc.automerge()
            .put(automerge::ROOT, "f/lying", lying.encode())
            .unwrap();
        doc.automerge().put(automerge::ROOT, "f/num", 5).unwrap();
        let results: Vec<_> = doc.entries().collect();
        assert_eq!(results.len(), 4);
        for result in results {
            match result {
                Err(DocumentError::Path(_)) => {}
                Ok(entry) => assert!(entry.entry.is_err(), "{:?} accepted", entry.path),
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert!(FolderDocument::load(b"not automerge", [], actor_id(&a, [0; 8])).is_err());
    }
}
