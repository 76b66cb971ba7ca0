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
/// Bytes of random suffix in an actor ID after the device ID.
pub const ACTOR_SUFFIX_LEN: usize = 8;

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
pub struct FolderDocument {
    doc: AutoCommit,
}

impl std::fmt::Debug for FolderDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FolderDocument({} actor)", self.doc.get_actor())
    }
}

/// One of the concurrent values at a path (or why it does not decode), with the device
/// whose actor wrote it ([`FolderDocument::get_all_written`]).
pub type WrittenValue = (Result<Entry, DocumentError>, Option<DeviceId>);

/// The actor ID of a device's store: device ID bytes then a random suffix.
pub fn actor_id(device: &DeviceId, suffix: [u8; ACTOR_SUFFIX_LEN]) -> ActorId {
    let mut bytes = device.as_bytes().to_vec();
    bytes.extend_from_slice(&suffix);
    ActorId::from(bytes)
}

/// The device an actor ID belongs to, if it follows Weft's actor layout.
pub fn actor_device(actor: &ActorId) -> Option<DeviceId> {
    let bytes = actor.to_bytes();
    if bytes.len() != 32 + ACTOR_SUFFIX_LEN {
        return None;
    }
    let key: [u8; 32] = bytes[..32].try_into().ok()?;
    DeviceId::from_bytes(key).ok()
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
        Ok(Self {
            doc: doc.with_actor(actor),
        })
    }

    /// Writes `entry` at `path` (one operation).
    pub fn put(&mut self, path: &RelPath, entry: &Entry) -> Result<(), DocumentError> {
        self.doc
            .put(automerge::ROOT, entry_key(path), entry.encode())
            .map_err(automerge_error)
    }

    /// The entry automerge picks for `path` (deterministic on every device).
    pub fn get(&self, path: &RelPath) -> Result<Option<Entry>, DocumentError> {
        let value = self
            .doc
            .get(automerge::ROOT, entry_key(path))
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
        let values = self
            .doc
            .get_all(automerge::ROOT, entry_key(path))
            .map_err(automerge_error)?;
        Ok(values
            .iter()
            .map(|(value, id)| {
                let entry = value_bytes(value)
                    .ok_or_else(|| DocumentError::Entry("not a bytes value".into()))
                    .and_then(Entry::decode);
                let writer = match id {
                    automerge::ObjId::Id(_, actor, _) => actor_device(actor),
                    automerge::ObjId::Root => None,
                };
                (entry, writer)
            })
            .collect())
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
        let values = self
            .doc
            .get_all(automerge::ROOT, key.as_str())
            .map_err(automerge_error)?;
        let mut overtaken = vec![false; values.len()];
        // More concurrent values than honest devices make: no walk (a hostile device
        // could mint values to make every plan of the path walk for each pair), and
        // every value is kept, which loses nothing.
        if values.len() < 2 || values.len() > MAX_WALKED_VALUES {
            return Ok(overtaken);
        }
        for (i, (value, id)) in values.iter().enumerate() {
            let Some(bytes) = value_bytes(value) else {
                continue;
            };
            let writer = match id {
                automerge::ObjId::Id(_, actor, _) => actor_device(actor),
                automerge::ObjId::Root => None,
            };
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
                    && value_bytes(other)
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

    /// Commits pending operations as one change, stamped with `time_ms` (ms since epoch).
    pub fn commit(&mut self, time_ms: i64, message: &str) {
        self.doc.commit_with(
            CommitOptions::default()
                .with_time(time_ms / 1000)
                .with_message(message),
        );
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

    /// Applies a sync message from a peer.
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
