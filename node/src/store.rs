//! The node's store: one redb database with everything that must survive a restart.
//!
//! Tables (keys and values; values are postcard unless said otherwise):
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | raw bytes: `schema_version` (u32 LE), `actor_suffix` (8 bytes) |
//! | `folders` | folder ID | [`FolderRecord`] |
//! | `local` | folder ID, NUL, path | [`LocalEntry`]: what the scanner last saw on disk |
//! | `synced` | folder ID, NUL, path | [`LocalEntry`]: what both sides last agreed on (used by the sync engine) |
//! | `manifests` | manifest hash | encoded [`Manifest`] |
//! | `blocks` | block hash, folder ID, NUL, path, NUL, offset (u64 BE) | block length (u32) |
//! | `doc_snapshots` | folder ID | the folder document, saved whole |
//! | `doc_increments` | folder ID, NUL, sequence (u64 BE) | changes saved since the snapshot |
//! | `devices` | device ID | [`DeviceRecord`]: accepted devices |
//! | `invites` | folder ID, NUL, inviting device ID | [`PendingInvite`]: invites received from accepted devices, not yet answered |
//! | `racy` | folder ID, NUL, path | empty: the `local` row is racily clean (recorded within its timestamp granularity of the file's last write; `scan` module doc) and must be hashed again |
//!
//! Invariants:
//! - A change that must survive a crash is one write transaction: a scan batch commits
//!   its `local` rows, manifests, block index rows and document increment together, so
//!   after `kill -9` the local tree and the document agree (nothing lost, nothing twice).
//! - Every `blocks` row points at a file whose `local` row has a manifest containing
//!   that block at that offset; rows are replaced with the file's `local` row.
//! - `manifests` is append-only for now: old manifests are version history.
//! - A racily clean `local` row is marked in `racy` in the transaction that writes it;
//!   a mark may outlive its reason (it only costs a hash), never the other way round.
//!
//! Schema changes bump [`SCHEMA_VERSION`] and add a step to [`Store::migrate`].

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use weft_protocol::change_signature::SignedChange;
use weft_protocol::wire::{Invite, Role};
use weft_protocol::{
    BlockHash, ChunkParams, DeviceId, FolderId, Manifest, ManifestHash, RelPath, Signature,
};

/// Current schema version of the store.
pub const SCHEMA_VERSION: u32 = 4;
/// redb's page cache. Its default (1 GiB) would let a cold scan of a large folder grow
/// the node's memory far past its budget; reads beyond this come from the OS page cache.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Increments kept before the document is compacted into a new snapshot.
pub const DOC_INCREMENTS_BEFORE_COMPACTION: u64 = 256;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FOLDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("folders");
const LOCAL: TableDefinition<&str, &[u8]> = TableDefinition::new("local");
const SYNCED: TableDefinition<&str, &[u8]> = TableDefinition::new("synced");
const MANIFESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("manifests");
const BLOCKS: TableDefinition<&[u8], u32> = TableDefinition::new("blocks");
const DOC_SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("doc_snapshots");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const INVITES: TableDefinition<&str, &[u8]> = TableDefinition::new("invites");
const DOC_INCREMENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("doc_increments");
const RACY: TableDefinition<&str, &[u8]> = TableDefinition::new("racy");
/// Authors' signatures of document changes: folder, 0, change hash -> signature.
const CHANGE_SIGNATURES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("change_signatures");

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O error, corruption, lock held by another process).
    #[error("database error: {0}")]
    Database(String),
    /// A stored record does not decode.
    #[error("stored record {what} is damaged: {detail}")]
    Record {
        /// Which record.
        what: String,
        /// Why.
        detail: String,
    },
    /// The store was written by a newer Weft.
    #[error(
        "the store has schema version {found}, newer than this weft ({SCHEMA_VERSION}); upgrade weft"
    )]
    TooNew {
        /// Version found on disk.
        found: u32,
    },
}

macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for StoreError {
            fn from(error: $error) -> Self {
                StoreError::Database(error.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A folder this node keeps in sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderRecord {
    /// The folder's ID, the same on every device.
    pub id: FolderId,
    /// A person's name for the folder.
    pub label: String,
    /// Where the folder is on this device (absolute).
    pub path: String,
    /// Chunk parameters, fixed at creation.
    pub params: ChunkParams,
    /// Whether this device publishes its local changes.
    pub mode: crate::engine::FolderMode,
    /// The folder's members and their roles, as this device last read them from the
    /// folder document's access list (the document decides; this copy lets the
    /// network layer check a request without asking the folder).
    pub devices: Vec<(DeviceId, Role)>,
    /// The device that created the folder (its access list must begin with it);
    /// `None` for a folder created here before folders had access lists: this device.
    pub founder: Option<DeviceId>,
}

/// [`FolderRecord`] as schema 3 stored it (before `founder`).
#[derive(Serialize, Deserialize)]
struct FolderRecordV3 {
    id: FolderId,
    label: String,
    path: String,
    params: ChunkParams,
    mode: crate::engine::FolderMode,
    devices: Vec<(DeviceId, Role)>,
}

/// A device this node accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device.
    pub id: DeviceId,
    /// A person's name for it.
    pub name: String,
    /// Addresses to dial it at (multiaddrs).
    pub addresses: Vec<String>,
}

/// An invite received and not yet answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInvite {
    /// The inviting device.
    pub from: DeviceId,
    /// The invite.
    pub invite: Invite,
}

pub use crate::engine::{LocalEntry, SyncedEntry};

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Record {
        what: what.to_owned(),
        detail: error.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).unwrap_or_default()
}

/// `folder NUL device`: the key of an invite.
fn invite_key(folder: &FolderId, from: &DeviceId) -> String {
    format!("{folder}\0{from}")
}

/// `folder NUL path`: the key of a per-folder, per-path row.
fn path_key(folder: &FolderId, path: &RelPath) -> String {
    format!("{folder}\0{path}")
}

/// Bounds of all per-path keys of a folder: `folder NUL` ..= `folder \x01`.
fn folder_range(folder: &FolderId) -> (String, String) {
    (format!("{folder}\0"), format!("{folder}\u{1}"))
}

fn block_key(hash: &BlockHash, folder: &FolderId, path: &RelPath, offset: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(32 + folder.as_str().len() + path.as_str().len() + 10);
    key.extend_from_slice(hash.as_bytes());
    key.extend_from_slice(folder.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(path.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

fn increment_key(folder: &FolderId, sequence: u64) -> Vec<u8> {
    let mut key = folder.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

fn increment_range(folder: &FolderId) -> (Vec<u8>, Vec<u8>) {
    let mut start = folder.as_str().as_bytes().to_vec();
    start.push(0);
    let mut end = folder.as_str().as_bytes().to_vec();
    end.push(1);
    (start, end)
}

/// A local copy of a block: in which file, at which offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLocation {
    /// The folder.
    pub folder: FolderId,
    /// The file.
    pub path: RelPath,
    /// Byte offset of the block in the file.
    pub offset: u64,
    /// Block length.
    pub len: u32,
}

pub use weft_core::scan::LocalChange;

/// The node's store.
pub struct Store {
    db: Database,
    actor_suffix: [u8; 8],
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the store at `path` and migrates it to [`SCHEMA_VERSION`].
    /// `random_suffix` is used only when the store is created.
    pub fn open(path: &Path, random_suffix: [u8; 8]) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
        let txn = db.begin_write()?;
        let actor_suffix;
        {
            let mut meta = txn.open_table(META)?;
            let version = match meta.get("schema_version")? {
                Some(bytes) => {
                    let raw: [u8; 4] =
                        bytes.value().try_into().map_err(|_| StoreError::Record {
                            what: "schema_version".into(),
                            detail: "not 4 bytes".into(),
                        })?;
                    u32::from_le_bytes(raw)
                }
                None => 0,
            };
            if version > SCHEMA_VERSION {
                return Err(StoreError::TooNew { found: version });
            }
            let suffix = match meta.get("actor_suffix")? {
                Some(bytes) => bytes.value().try_into().ok(),
                None => None,
            };
            actor_suffix = match suffix {
                Some(suffix) => suffix,
                None => {
                    meta.insert("actor_suffix", random_suffix.as_slice())?;
                    random_suffix
                }
            };
            Self::migrate(&txn, version)?;
            meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        Ok(Self { db, actor_suffix })
    }

    /// Brings a store at `from` up to [`SCHEMA_VERSION`]: version 0 is a new store.
    fn migrate(txn: &redb::WriteTransaction, from: u32) -> Result<(), StoreError> {
        if from < 1 {
            // Create every table so that readers never meet a missing one.
            txn.open_table(FOLDERS)?;
            txn.open_table(LOCAL)?;
            txn.open_table(SYNCED)?;
            txn.open_table(MANIFESTS)?;
            txn.open_table(BLOCKS)?;
            txn.open_table(DOC_SNAPSHOTS)?;
            txn.open_table(DOC_INCREMENTS)?;
            txn.open_table(DEVICES)?;
            txn.open_table(INVITES)?;
        }
        if from < 2 {
            txn.open_table(CHANGE_SIGNATURES)?;
        }
        if from < 3 {
            txn.open_table(RACY)?;
        }
        if (1..4).contains(&from) {
            // Folder records gained `founder`; invites gained the founder and are
            // dropped (the inviter sends them again when it next connects).
            let mut folders = txn.open_table(FOLDERS)?;
            let mut records = Vec::new();
            for row in folders.iter()? {
                let (key, value) = row?;
                let old: FolderRecordV3 =
                    decode(&format!("folder {}", key.value()), value.value())?;
                records.push(FolderRecord {
                    id: old.id,
                    label: old.label,
                    path: old.path,
                    params: old.params,
                    mode: old.mode,
                    devices: old.devices,
                    founder: None,
                });
            }
            for record in records {
                folders.insert(record.id.as_str(), encode(&record).as_slice())?;
            }
            txn.open_table(INVITES)?.retain(|_, _| false)?;
        }
        Ok(())
    }

    /// The random suffix of this store's automerge actor IDs.
    pub fn actor_suffix(&self) -> [u8; 8] {
        self.actor_suffix
    }

    /// Every folder.
    pub fn folders(&self) -> Result<Vec<FolderRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FOLDERS)?;
        let mut folders = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            folders.push(decode(&format!("folder {}", key.value()), value.value())?);
        }
        Ok(folders)
    }

    /// Adds or replaces a folder record.
    pub fn put_folder(&self, folder: &FolderRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(FOLDERS)?
            .insert(folder.id.as_str(), encode(folder).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Forgets a folder and all its rows (never touches its files).
    pub fn remove_folder(&self, folder: &FolderId) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(FOLDERS)?.remove(folder.as_str())?.is_some();
        let (start, end) = folder_range(folder);
        for table in [LOCAL, SYNCED, RACY] {
            txn.open_table(table)?
                .retain_in(start.as_str()..end.as_str(), |_, _| false)?;
        }
        txn.open_table(DOC_SNAPSHOTS)?.remove(folder.as_str())?;
        let (start, end) = increment_range(folder);
        txn.open_table(DOC_INCREMENTS)?
            .retain_in(start.as_slice()..end.as_slice(), |_, _| false)?;
        txn.open_table(CHANGE_SIGNATURES)?
            .retain_in(start.as_slice()..end.as_slice(), |_, _| false)?;
        // Block rows carry the folder after the hash; filter them all.
        let folder_bytes = folder.as_str().as_bytes();
        txn.open_table(BLOCKS)?.retain(|key, _| {
            let rest = &key[32..];
            !(rest.starts_with(folder_bytes) && rest.get(folder_bytes.len()) == Some(&0))
        })?;
        txn.commit()?;
        Ok(existed)
    }

    fn all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut rows = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            rows.push(decode(key.value(), value.value())?);
        }
        Ok(rows)
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: Option<&T>,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut table = txn.open_table(table)?;
            match value {
                Some(value) => table.insert(key, encode(value).as_slice())?.is_some(),
                None => table.remove(key)?.is_some(),
            }
        };
        txn.commit()?;
        Ok(existed)
    }

    /// Accepted devices.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.all(DEVICES)
    }

    /// Adds or replaces an accepted device.
    pub fn put_device(&self, device: &DeviceRecord) -> Result<(), StoreError> {
        self.put(DEVICES, &device.id.to_string(), Some(device))
            .map(|_| ())
    }

    /// Forgets a device; true if it was known.
    pub fn remove_device(&self, device: &DeviceId) -> Result<bool, StoreError> {
        self.put::<DeviceRecord>(DEVICES, &device.to_string(), None)
    }

    /// Pending invites.
    pub fn invites(&self) -> Result<Vec<PendingInvite>, StoreError> {
        self.all(INVITES)
    }

    /// Records (or replaces) the invite of its inviting device to its folder.
    pub fn put_invite(&self, invite: &PendingInvite) -> Result<(), StoreError> {
        self.put(
            INVITES,
            &invite_key(&invite.invite.folder, &invite.from),
            Some(invite),
        )
        .map(|_| ())
    }

    /// Drops `from`'s invite to `folder`; true if there was one.
    pub fn remove_invite(&self, folder: &FolderId, from: &DeviceId) -> Result<bool, StoreError> {
        self.put::<PendingInvite>(INVITES, &invite_key(folder, from), None)
    }

    /// One per-path row of `table`.
    fn path_row<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        folder: &FolderId,
        path: &RelPath,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        match table.get(path_key(folder, path).as_str())? {
            Some(bytes) => Ok(Some(decode(&format!("row of {path}"), bytes.value())?)),
            None => Ok(None),
        }
    }

    /// The local row of one path.
    pub fn local(
        &self,
        folder: &FolderId,
        path: &RelPath,
    ) -> Result<Option<LocalEntry>, StoreError> {
        self.path_row(LOCAL, folder, path)
    }

    /// The synced entry of a path.
    pub fn synced(
        &self,
        folder: &FolderId,
        path: &RelPath,
    ) -> Result<Option<SyncedEntry>, StoreError> {
        self.path_row(SYNCED, folder, path)
    }

    /// The whole synced tree of a folder.
    pub fn synced_tree(
        &self,
        folder: &FolderId,
    ) -> Result<std::collections::BTreeMap<RelPath, SyncedEntry>, StoreError> {
        self.path_rows(SYNCED, folder, None)
    }

    /// The local tree of a folder.
    pub fn local_tree(
        &self,
        folder: &FolderId,
    ) -> Result<std::collections::BTreeMap<RelPath, LocalEntry>, StoreError> {
        self.path_rows(LOCAL, folder, None)
    }

    /// The local rows at `under` and inside it (or the whole folder for `None`).
    pub fn local_under(
        &self,
        folder: &FolderId,
        under: Option<&RelPath>,
    ) -> Result<std::collections::BTreeMap<RelPath, LocalEntry>, StoreError> {
        self.path_rows(LOCAL, folder, under)
    }

    /// The per-path rows of `table` for a folder, at `under` and inside it (or all).
    fn path_rows<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        folder: &FolderId,
        under: Option<&RelPath>,
    ) -> Result<std::collections::BTreeMap<RelPath, T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let (start, end) = match under {
            None => folder_range(folder),
            // Keys from "under" up to "under" + U+10FFFF: a superset of the subtree
            // (siblings such as "under b" sort in between), filtered below.
            Some(path) => (
                path_key(folder, path),
                format!("{}\u{10FFFF}", path_key(folder, path)),
            ),
        };
        let mut tree = std::collections::BTreeMap::new();
        for row in table.range(start.as_str()..end.as_str())? {
            let (key, value) = row?;
            let key = key.value();
            let Some((_, path)) = key.split_once('\0') else {
                continue;
            };
            let path = RelPath::new(path).map_err(|error| StoreError::Record {
                what: format!("path {path:?}"),
                detail: error.to_string(),
            })?;
            if let Some(under) = under
                && !path.starts_with(under)
            {
                continue;
            }
            let row = decode(&format!("row of {path}"), value.value())?;
            tree.insert(path, row);
        }
        Ok(tree)
    }

    /// A manifest by hash.
    pub fn manifest(&self, hash: &ManifestHash) -> Result<Option<Manifest>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MANIFESTS)?;
        match table.get(hash.as_bytes().as_slice())? {
            None => Ok(None),
            Some(bytes) => {
                Manifest::decode(bytes.value())
                    .map(Some)
                    .map_err(|error| StoreError::Record {
                        what: format!("manifest {hash}"),
                        detail: error.to_string(),
                    })
            }
        }
    }

    /// Every local copy of a block.
    pub fn block_locations(&self, hash: &BlockHash) -> Result<Vec<BlockLocation>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let start = hash.as_bytes().to_vec();
        let mut end = start.clone();
        end.push(0xff);
        let mut locations = Vec::new();
        for row in table.range(start.as_slice()..end.as_slice())? {
            let (key, len) = row?;
            let key = key.value();
            let rest = &key[32..];
            let damaged = || StoreError::Record {
                what: "block index row".into(),
                detail: "malformed key".into(),
            };
            let folder_end = rest.iter().position(|&b| b == 0).ok_or_else(damaged)?;
            let offset_start = rest.len().checked_sub(8).ok_or_else(damaged)?;
            let folder = std::str::from_utf8(&rest[..folder_end]).map_err(|_| damaged())?;
            let path = std::str::from_utf8(&rest[folder_end + 1..offset_start - 1])
                .map_err(|_| damaged())?;
            let offset =
                u64::from_be_bytes(rest[offset_start..].try_into().map_err(|_| damaged())?);
            locations.push(BlockLocation {
                folder: FolderId::new(folder).map_err(|_| damaged())?,
                path: RelPath::new(path).map_err(|_| damaged())?,
                offset,
                len: len.value(),
            });
        }
        Ok(locations)
    }

    /// Number of block index rows (for tests and status).
    pub fn block_index_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(BLOCKS)?.len()?)
    }

    /// The saved folder document: its snapshot and increments in order.
    pub fn document(&self, folder: &FolderId) -> Result<(Vec<u8>, Vec<Vec<u8>>), StoreError> {
        let txn = self.db.begin_read()?;
        let snapshot = txn
            .open_table(DOC_SNAPSHOTS)?
            .get(folder.as_str())?
            .map(|bytes| bytes.value().to_vec())
            .unwrap_or_default();
        let (start, end) = increment_range(folder);
        let mut increments = Vec::new();
        for row in txn
            .open_table(DOC_INCREMENTS)?
            .range(start.as_slice()..end.as_slice())?
        {
            increments.push(row?.1.value().to_vec());
        }
        Ok((snapshot, increments))
    }

    /// Every kept change signature of a folder's document.
    pub fn change_signatures(&self, folder: &FolderId) -> Result<Vec<SignedChange>, StoreError> {
        let txn = self.db.begin_read()?;
        let (start, end) = increment_range(folder);
        let mut signed = Vec::new();
        for row in txn
            .open_table(CHANGE_SIGNATURES)?
            .range(start.as_slice()..end.as_slice())?
        {
            let (key, value) = row?;
            let bad = |detail: &str| StoreError::Record {
                what: "change signature".into(),
                detail: detail.into(),
            };
            let hash = key.value()[start.len()..]
                .try_into()
                .map_err(|_| bad("key is not a folder and a 32-byte hash"))?;
            let signature = value.value().try_into().map_err(|_| bad("not 64 bytes"))?;
            signed.push(SignedChange {
                hash,
                signature: Signature(signature),
            });
        }
        Ok(signed)
    }

    /// Keeps change signatures of a folder's document (already verified).
    pub fn put_change_signatures(
        &self,
        folder: &FolderId,
        signed: &[SignedChange],
    ) -> Result<(), StoreError> {
        if signed.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(CHANGE_SIGNATURES)?;
            let (mut key, _) = increment_range(folder);
            let prefix = key.len();
            for change in signed {
                key.truncate(prefix);
                key.extend_from_slice(&change.hash);
                table.insert(key.as_slice(), change.signature.0.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Replaces the document with a compacted snapshot and drops its increments.
    pub fn compact_document(&self, folder: &FolderId, snapshot: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(DOC_SNAPSHOTS)?
            .insert(folder.as_str(), snapshot)?;
        let (start, end) = increment_range(folder);
        txn.open_table(DOC_INCREMENTS)?
            .retain_in(start.as_slice()..end.as_slice(), |_, _| false)?;
        txn.commit()?;
        Ok(())
    }

    /// Commits one scan batch: local rows, manifests, block index rows and the
    /// document increment, atomically. Returns the number of increments now stored.
    pub fn commit_scan_batch(
        &self,
        folder: &FolderId,
        changes: &[LocalChange],
        document_increment: &[u8],
    ) -> Result<u64, StoreError> {
        self.commit_scan_batch_with(folder, changes, &[], document_increment, &[])
    }

    /// The paths of the folder whose `local` rows are marked racily clean.
    pub fn racy_paths(&self, folder: &FolderId) -> Result<Vec<RelPath>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RACY)?;
        let (start, end) = folder_range(folder);
        let mut paths = Vec::new();
        for row in table.range(start.as_str()..end.as_str())? {
            let (key, _) = row?;
            let key = key.value();
            let path = key
                .split_once('\0')
                .and_then(|(_, path)| RelPath::new(path).ok())
                .ok_or_else(|| StoreError::Record {
                    what: "racy mark".into(),
                    detail: format!("malformed key {key:?}"),
                })?;
            paths.push(path);
        }
        Ok(paths)
    }

    /// Removes the racily clean marks of `paths` (hashed again, no longer racy).
    pub fn clear_racy(&self, folder: &FolderId, paths: &[RelPath]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut marks = txn.open_table(RACY)?;
            for path in paths {
                marks.remove(path_key(folder, path).as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// [`Store::commit_scan_batch`] plus synced-tree updates, atomically; `racy` are the
    /// paths among `changes` whose rows are racily clean, marked in the same transaction
    /// (a removed path loses its mark).
    pub fn commit_scan_batch_with(
        &self,
        folder: &FolderId,
        changes: &[LocalChange],
        synced_updates: &[(RelPath, Option<SyncedEntry>)],
        document_increment: &[u8],
        racy: &[RelPath],
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let increments;
        {
            let mut marks = txn.open_table(RACY)?;
            for path in racy {
                marks.insert(path_key(folder, path).as_str(), [].as_slice())?;
            }
            for change in changes {
                if let LocalChange::Remove { path } = change {
                    marks.remove(path_key(folder, path).as_str())?;
                }
            }
        }
        {
            let mut synced = txn.open_table(SYNCED)?;
            for (path, entry) in synced_updates {
                let key = path_key(folder, path);
                match entry {
                    Some(entry) => {
                        synced.insert(key.as_str(), encode(entry).as_slice())?;
                    }
                    None => {
                        synced.remove(key.as_str())?;
                    }
                }
            }
        }
        {
            let mut local = txn.open_table(LOCAL)?;
            let mut manifests = txn.open_table(MANIFESTS)?;
            let mut blocks = txn.open_table(BLOCKS)?;
            for change in changes {
                let path = match change {
                    LocalChange::Upsert { path, .. } | LocalChange::Remove { path } => path,
                };
                let key = path_key(folder, path);
                // Drop the old file's block rows.
                let old: Option<LocalEntry> = match local.get(key.as_str())? {
                    Some(bytes) => Some(decode("local entry", bytes.value())?),
                    None => None,
                };
                if let Some(old_hash) = old.and_then(|old| old.manifest) {
                    let old_manifest = match manifests.get(old_hash.as_bytes().as_slice())? {
                        Some(bytes) => Manifest::decode(bytes.value()).ok(),
                        None => None,
                    };
                    if let Some(old_manifest) = old_manifest {
                        for (offset, block) in old_manifest.blocks_with_offsets() {
                            blocks
                                .remove(block_key(&block.hash, folder, path, offset).as_slice())?;
                        }
                    }
                }
                match change {
                    LocalChange::Upsert {
                        entry, manifest, ..
                    } => {
                        local.insert(key.as_str(), encode(entry).as_slice())?;
                        if let Some(manifest) = manifest {
                            let hash = manifest.hash();
                            if manifests.get(hash.as_bytes().as_slice())?.is_none() {
                                manifests.insert(
                                    hash.as_bytes().as_slice(),
                                    manifest.encode().as_slice(),
                                )?;
                            }
                            for (offset, block) in manifest.blocks_with_offsets() {
                                blocks.insert(
                                    block_key(&block.hash, folder, path, offset).as_slice(),
                                    block.len,
                                )?;
                            }
                        }
                    }
                    LocalChange::Remove { .. } => {
                        local.remove(key.as_str())?;
                    }
                }
            }
            let mut doc_increments = txn.open_table(DOC_INCREMENTS)?;
            let (start, end) = increment_range(folder);
            let next = match doc_increments
                .range(start.as_slice()..end.as_slice())?
                .next_back()
            {
                Some(row) => {
                    let (key, _) = row?;
                    let key = key.value();
                    let raw: [u8; 8] =
                        key[key.len() - 8..]
                            .try_into()
                            .map_err(|_| StoreError::Record {
                                what: "document increment key".into(),
                                detail: "malformed".into(),
                            })?;
                    u64::from_be_bytes(raw) + 1
                }
                None => 0,
            };
            if !document_increment.is_empty() {
                doc_increments
                    .insert(increment_key(folder, next).as_slice(), document_increment)?;
            }
            increments = next + 1;
        }
        txn.commit()?;
        Ok(increments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_protocol::BlockRef;
    use weft_protocol::document::EntryKind;

    fn folder() -> FolderId {
        FolderId::new("f1").unwrap()
    }

    /// Edits the redb file at `path` behind the store's back and sets its schema
    /// version: how stores of other versions are made for tests.
    fn rewrite_store(path: &Path, version: u32, edit: impl FnOnce(&redb::WriteTransaction)) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        edit(&txn);
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", version.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn a_schema_1_store_gains_the_later_tables_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, [4; 8]).unwrap();
        store
            .put_invite(&PendingInvite {
                from: weft_protocol::DeviceKey::from_secret_bytes([1; 32]).device_id(),
                invite: Invite {
                    folder: folder(),
                    label: "photos".into(),
                    params: ChunkParams::default(),
                    role: Role::Edit,
                    founder: weft_protocol::DeviceKey::from_secret_bytes([1; 32]).device_id(),
                },
            })
            .unwrap();
        drop(store);
        // Make it a schema 1 store: no signature table, version 1, and a folder record
        // as it was before `founder`.
        let peer = weft_protocol::DeviceKey::from_secret_bytes([2; 32]).device_id();
        rewrite_store(&path, 1, |txn| {
            txn.delete_table(CHANGE_SIGNATURES).unwrap();
            let old = FolderRecordV3 {
                id: folder(),
                label: "photos".into(),
                path: "/photos".into(),
                params: ChunkParams::default(),
                mode: crate::engine::FolderMode::SendReceive,
                devices: vec![(peer, Role::Edit)],
            };
            txn.open_table(FOLDERS)
                .unwrap()
                .insert(folder().as_str(), encode(&old).as_slice())
                .unwrap();
        });
        let store = Store::open(&path, [5; 8]).unwrap();
        assert_eq!(store.actor_suffix(), [4; 8]);
        // Invites from before founders were carried are dropped; folder records kept.
        assert!(store.invites().unwrap().is_empty());
        let folders = store.folders().unwrap();
        assert_eq!(folders.len(), 1);
        assert_eq!(folders[0].devices, vec![(peer, Role::Edit)]);
        assert_eq!(folders[0].founder, None);
        assert!(store.change_signatures(&folder()).unwrap().is_empty());
        let signed = SignedChange {
            hash: [7; 32],
            signature: Signature([9; 64]),
        };
        store.put_change_signatures(&folder(), &[signed]).unwrap();
        assert_eq!(store.change_signatures(&folder()).unwrap(), vec![signed]);
        // ... and the racy table of schema 3.
        assert!(store.racy_paths(&folder()).unwrap().is_empty());
        // Another folder's signatures are its own.
        assert!(
            store
                .change_signatures(&FolderId::new("f10").unwrap())
                .unwrap()
                .is_empty()
        );
    }

    fn manifest(seed: u8) -> Manifest {
        Manifest::from_blocks(vec![
            BlockRef {
                hash: BlockHash([seed; 32]),
                len: 10,
            },
            BlockRef {
                hash: BlockHash([seed + 1; 32]),
                len: 5,
            },
        ])
        .unwrap()
    }

    fn file_entry(manifest: &Manifest) -> LocalEntry {
        LocalEntry {
            kind: EntryKind::File,
            size: manifest.size(),
            mtime_ns: 1,
            mode: 0o644,
            inode: 7,
            manifest: Some(manifest.hash()),
            symlink_target: None,
        }
    }

    #[test]
    fn scan_batches_keep_index_and_tree_in_step_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("weft.redb");
        let store = Store::open(&db, [1; 8]).unwrap();
        let path = RelPath::new("a/b.txt").unwrap();
        let first = manifest(1);
        store
            .commit_scan_batch(
                &folder(),
                &[LocalChange::Upsert {
                    path: path.clone(),
                    entry: file_entry(&first),
                    manifest: Some(first.clone()),
                }],
                b"inc0",
            )
            .unwrap();
        assert_eq!(
            store.block_locations(&BlockHash([2; 32])).unwrap()[0].offset,
            10
        );
        // Replace the file: old block rows go, new ones come.
        let second = manifest(5);
        let count = store
            .commit_scan_batch(
                &folder(),
                &[LocalChange::Upsert {
                    path: path.clone(),
                    entry: file_entry(&second),
                    manifest: Some(second.clone()),
                }],
                b"inc1",
            )
            .unwrap();
        assert_eq!(count, 2);
        assert!(
            store
                .block_locations(&BlockHash([1; 32]))
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.block_index_len().unwrap(), 2);
        drop(store);
        let store = Store::open(&db, [9; 8]).unwrap();
        assert_eq!(store.actor_suffix(), [1; 8], "actor suffix survives reopen");
        let tree = store.local_tree(&folder()).unwrap();
        assert_eq!(tree[&path], file_entry(&second));
        assert_eq!(store.manifest(&first.hash()).unwrap(), Some(first));
        let (_, increments) = store.document(&folder()).unwrap();
        assert_eq!(increments, vec![b"inc0".to_vec(), b"inc1".to_vec()]);
        store
            .commit_scan_batch(
                &folder(),
                &[LocalChange::Remove { path: path.clone() }],
                b"",
            )
            .unwrap();
        assert!(store.local_tree(&folder()).unwrap().is_empty());
        assert_eq!(store.block_index_len().unwrap(), 0);
    }

    #[test]
    fn local_under_selects_a_subtree_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), [0; 8]).unwrap();
        let dir_entry = LocalEntry {
            kind: EntryKind::Directory,
            size: 0,
            mtime_ns: 0,
            mode: 0o755,
            inode: 1,
            manifest: None,
            symlink_target: None,
        };
        let changes: Vec<LocalChange> = ["a", "a/x", "a b", "ab", "a/y/z"]
            .iter()
            .map(|p| LocalChange::Upsert {
                path: RelPath::new(p).unwrap(),
                entry: dir_entry.clone(),
                manifest: None,
            })
            .collect();
        store.commit_scan_batch(&folder(), &changes, b"").unwrap();
        let under: Vec<String> = store
            .local_under(&folder(), Some(&RelPath::new("a").unwrap()))
            .unwrap()
            .keys()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(under, vec!["a", "a/x", "a/y/z"]);
        // Another folder's rows are separate, and removing a folder drops only its rows.
        let other = FolderId::new("f2").unwrap();
        store
            .commit_scan_batch(&other, &changes[..1], b"x")
            .unwrap();
        store.remove_folder(&folder()).unwrap();
        assert!(store.local_tree(&folder()).unwrap().is_empty());
        assert_eq!(store.local_tree(&other).unwrap().len(), 1);
    }

    #[test]
    fn racy_marks_are_written_with_their_rows_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let store = Store::open(&db, [0; 8]).unwrap();
        let manifest = Manifest::from_blocks(vec![]).unwrap();
        let (a, b) = (RelPath::new("a").unwrap(), RelPath::new("d/b").unwrap());
        let upsert = |path: &RelPath| LocalChange::Upsert {
            path: path.clone(),
            entry: file_entry(&manifest),
            manifest: Some(manifest.clone()),
        };
        store
            .commit_scan_batch_with(
                &folder(),
                &[upsert(&a), upsert(&b)],
                &[],
                b"",
                &[a.clone(), b.clone()],
            )
            .unwrap();
        let other = FolderId::new("f2").unwrap();
        store
            .commit_scan_batch_with(&other, &[upsert(&a)], &[], b"", std::slice::from_ref(&a))
            .unwrap();
        drop(store);
        let store = Store::open(&db, [0; 8]).unwrap();
        assert_eq!(
            store.racy_paths(&folder()).unwrap(),
            vec![a.clone(), b.clone()]
        );
        // A removed path loses its mark in the same transaction; a cleared one goes.
        store
            .commit_scan_batch(&folder(), &[LocalChange::Remove { path: b.clone() }], b"")
            .unwrap();
        assert_eq!(store.racy_paths(&folder()).unwrap(), vec![a.clone()]);
        store
            .clear_racy(&folder(), std::slice::from_ref(&a))
            .unwrap();
        assert!(store.racy_paths(&folder()).unwrap().is_empty());
        // Another folder's marks are its own, and go with it.
        assert_eq!(store.racy_paths(&other).unwrap(), vec![a]);
        store.remove_folder(&other).unwrap();
        assert!(store.racy_paths(&other).unwrap().is_empty());
    }

    #[test]
    fn a_store_from_the_future_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        rewrite_store(&path, 99, |_| {});
        assert!(matches!(
            Store::open(&path, [0; 8]),
            Err(StoreError::TooNew { found: 99 })
        ));
    }
}
