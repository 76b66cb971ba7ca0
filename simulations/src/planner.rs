//! A CanopyCheck-style property check of the planner alone (Dropbox's check of its
//! Nucleus planner): random but correlated local, remote and synced trees; the
//! planner's actions for every path applied in a shuffled order; repeated until it
//! plans nothing. It must stop within a bound, leave the three trees in agreement,
//! and keep every edit (a local edit and every live remote value end up as a file).
//!
//! The model is one device in a send-receive folder. The local tree is the disk as
//! the scanner reports it (so applying an action updates it at once); the remote tree
//! is the document, one or more concurrent values per path; publishing or resolving
//! writes one value, which supersedes the values it saw, as automerge does.

use std::collections::{BTreeMap, BTreeSet};

use weft_core::engine::{
    self, Action, FolderMode, LocalEntry, PathView, Remote, SyncedEntry, local_matches,
    publish_entry,
};
use weft_protocol::document::{Content, Entry, EntryKind};
use weft_protocol::{DeviceId, DeviceKey, Manifest, ManifestHash, RelPath};

use crate::disk::directory_entry;
use crate::executor::manifest_of;
use crate::rng::Rng;

/// Paths the trees are made of: nested, so parents and children interact.
const PATHS: [&str; 10] = [
    "a",
    "a/b",
    "a/b/c.txt",
    "a/d.txt",
    "e.txt",
    "f",
    "f/g.txt",
    "f/h",
    "f/h/i.txt",
    "j.txt",
];

/// The three trees of one device.
#[derive(Clone, Debug, Default)]
struct Trees {
    local: BTreeMap<RelPath, LocalEntry>,
    synced: BTreeMap<RelPath, SyncedEntry>,
    remote: BTreeMap<RelPath, Vec<Entry>>,
    manifests: BTreeMap<ManifestHash, Manifest>,
    next_inode: u64,
}

fn device(seed: u8) -> DeviceId {
    DeviceKey::from_secret_bytes([seed; 32]).device_id()
}

fn path(text: &str) -> RelPath {
    RelPath::new(text).unwrap_or_else(|_| unreachable!("the fixed paths are valid"))
}

fn is_dir_path(text: &str) -> bool {
    !text.contains('.')
}

/// A live tree (path -> content version; 0 for directories) that keeps every live
/// path's parent live.
type Shape = BTreeMap<&'static str, u8>;

fn random_shape(rng: &mut Rng) -> Shape {
    let mut shape = Shape::new();
    for text in PATHS {
        let parent_live = match text.rsplit_once('/') {
            Some((parent, _)) => shape.contains_key(parent),
            None => true,
        };
        if parent_live && rng.chance(70) {
            shape.insert(
                text,
                if is_dir_path(text) {
                    0
                } else {
                    rng.range(1, 3) as u8
                },
            );
        }
    }
    shape
}

/// `base` changed a little: edits, deletes (whole subtrees), creations.
fn mutate(base: &Shape, rng: &mut Rng, fresh: u8) -> Shape {
    let mut shape = base.clone();
    for text in PATHS {
        if !rng.chance(35) {
            continue;
        }
        match shape.get(text).copied() {
            Some(0) => {
                shape.retain(|p, _| !(*p == text || p.starts_with(&format!("{text}/"))));
            }
            Some(_) if rng.chance(50) => {
                shape.remove(text);
            }
            Some(_) => {
                shape.insert(text, fresh + rng.below(3) as u8);
            }
            None => {
                let parent_live = match text.rsplit_once('/') {
                    Some((parent, _)) => shape.get(parent) == Some(&0),
                    None => true,
                };
                if parent_live {
                    shape.insert(
                        text,
                        if is_dir_path(text) {
                            0
                        } else {
                            fresh + rng.below(3) as u8
                        },
                    );
                }
            }
        }
    }
    shape
}

impl Trees {
    fn manifest(&mut self, version: u8) -> Manifest {
        let manifest = manifest_of(&[version; 40]);
        self.manifests.insert(manifest.hash(), manifest.clone());
        manifest
    }

    fn local_entry(&mut self, version: u8, mtime: i64) -> LocalEntry {
        self.next_inode += 1;
        let file = version != 0;
        let manifest = file.then(|| self.manifest(version));
        LocalEntry {
            kind: if file {
                EntryKind::File
            } else {
                EntryKind::Directory
            },
            size: manifest.as_ref().map_or(0, Manifest::size),
            mtime_ns: if file { mtime } else { 0 },
            mode: if file { 0o644 } else { 0o755 },
            inode: if file { self.next_inode } else { 0 },
            manifest: manifest.map(|m| m.hash()),
            symlink_target: None,
        }
    }

    fn remote_entry(&mut self, version: u8, mtime: i64, author: DeviceId, dir: bool) -> Entry {
        if dir {
            return Entry {
                kind: EntryKind::Directory,
                deleted: false,
                size: 0,
                mtime_ns: mtime,
                mode: 0o755,
                content: Content::None,
                author,
            };
        }
        let manifest = self.manifest(version);
        Entry {
            kind: EntryKind::File,
            deleted: false,
            size: manifest.size(),
            mtime_ns: mtime,
            mode: 0o644,
            content: Content::for_manifest(&manifest),
            author,
        }
    }
}

/// Builds correlated trees: synced = a base both sides agreed on; local and remote
/// = independent changes of it; sometimes a second remote device changed it too
/// (concurrent values).
fn generate(rng: &mut Rng) -> Trees {
    let (me, other, third) = (device(1), device(2), device(3));
    let base = random_shape(rng);
    let local = mutate(&base, rng, 10);
    let remote = mutate(&base, rng, 20);
    let concurrent = rng.chance(40).then(|| mutate(&base, rng, 30));
    let mut trees = Trees::default();
    for (text, version) in &base {
        let local = trees.local_entry(*version, 1_000);
        let entry = publish_entry(
            &local,
            local
                .manifest
                .and_then(|m| trees.manifests.get(&m))
                .cloned()
                .as_ref(),
            me,
        );
        trees.synced.insert(
            path(text),
            SyncedEntry {
                entry: entry.clone(),
                local: Some(local),
            },
        );
        trees.remote.insert(path(text), vec![entry]);
    }
    for (text, version) in &local {
        let entry = match base.get(text) {
            Some(old) if old == version => trees.synced[&path(text)]
                .local
                .clone()
                .unwrap_or_else(|| unreachable!()),
            _ => trees.local_entry(*version, 2_000),
        };
        trees.local.insert(path(text), entry);
    }
    let apply_remote = |trees: &mut Trees,
                        shape: &Shape,
                        author: DeviceId,
                        mtime: i64,
                        against: Option<&Shape>| {
        for text in PATHS {
            let before = base.get(text);
            let after = shape.get(text);
            if before == after {
                continue;
            }
            let value = match after {
                Some(version) => trees.remote_entry(*version, mtime, author, *version == 0),
                None => {
                    let Some(current) = trees
                        .remote
                        .get(&path(text))
                        .and_then(|v| v.first())
                        .cloned()
                    else {
                        continue;
                    };
                    engine::tombstone(&current, mtime, author)
                }
            };
            let values = trees.remote.entry(path(text)).or_default();
            // Concurrent only where the other writer changed the path too; where it
            // did not, this writer saw the base value and supersedes it.
            let both_changed = against.is_some_and(|other| other.get(text) != before);
            if both_changed && !values.is_empty() {
                values.push(value);
            } else {
                *values = vec![value];
            }
        }
    };
    apply_remote(&mut trees, &remote, other, 3_000, None);
    if let Some(shape) = concurrent {
        // Concurrent with `remote`: values on paths both changed stand side by side.
        apply_remote(&mut trees, &shape, third, 4_000, Some(&remote));
    }
    trees
}

fn short(hash: Option<ManifestHash>) -> String {
    hash.map_or("-".into(), |h| h.to_hex()[..6].to_owned())
}

fn show_entry(entry: &Entry) -> String {
    if entry.deleted {
        format!("deleted@{}", entry.mtime_ns)
    } else if entry.kind == EntryKind::Directory {
        "dir".into()
    } else {
        format!(
            "{}@{}",
            short(entry.content.manifest_hash()),
            entry.mtime_ns
        )
    }
}

/// A compact picture of the trees, one line per path.
fn show(trees: &Trees) -> String {
    all_paths(trees)
        .iter()
        .map(|path| {
            let local = trees.local.get(path).map_or("-".into(), |l| match l.kind {
                EntryKind::Directory => "dir".into(),
                _ => short(l.manifest),
            });
            let synced = trees
                .synced
                .get(path)
                .map_or("-".into(), |s| show_entry(&s.entry));
            let remote: Vec<String> = trees
                .remote
                .get(path)
                .map(|v| v.iter().map(show_entry).collect())
                .unwrap_or_default();
            format!("  {path}: local {local}, synced {synced}, remote {remote:?}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn show_action(action: &Action) -> String {
    match action {
        Action::MarkSynced { path, .. } => format!("mark_synced {path}"),
        Action::Publish { path } => format!("publish {path}"),
        Action::Apply { path, entry, .. } => format!("apply {path} {}", show_entry(entry)),
        Action::Remove { path, .. } => format!("remove {path}"),
        Action::MoveToConflictCopy { path, to, .. } => format!("conflict_copy {path} -> {to}"),
        Action::Resolve {
            path,
            winner,
            copies,
        } => format!(
            "resolve {path} winner {} copies {:?}",
            show_entry(winner),
            copies
                .iter()
                .map(|(p, e)| format!("{p}={}", show_entry(e)))
                .collect::<Vec<_>>()
        ),
        Action::KeepLocal { path } => format!("keep_local {path}"),
    }
}

fn remote_of(trees: &Trees, path: &RelPath) -> Remote {
    match trees.remote.get(path).map(Vec::as_slice) {
        None | Some([]) => Remote::Absent,
        Some([one]) => Remote::Value(one.clone()),
        Some(many) => Remote::Conflict(many.to_vec()),
    }
}

fn all_paths(trees: &Trees) -> Vec<RelPath> {
    let mut paths: BTreeSet<RelPath> = trees.local.keys().cloned().collect();
    paths.extend(trees.synced.keys().cloned());
    paths.extend(trees.remote.keys().cloned());
    paths.into_iter().collect()
}

/// Contents that must survive: local edits and live remote values that differ from
/// what was synced.
fn edits(trees: &Trees) -> BTreeSet<ManifestHash> {
    let mut edits = BTreeSet::new();
    for (path, local) in &trees.local {
        let synced = trees.synced.get(path).and_then(|s| s.local.as_ref());
        if let Some(hash) = local.manifest
            && synced.and_then(|s| s.manifest) != Some(hash)
        {
            edits.insert(hash);
        }
    }
    for (path, values) in &trees.remote {
        let synced = trees.synced.get(path).map(|s| &s.entry);
        for value in values {
            if !value.deleted
                && !engine::same_content(Some(value), synced)
                && let Some(hash) = value.content.manifest_hash()
            {
                edits.insert(hash);
            }
        }
    }
    edits
}

/// One case: the result is `Err` with what went wrong.
pub fn check_case(seed: u64) -> Result<usize, String> {
    let mut rng = Rng::new(seed);
    let mut trees = generate(&mut rng);
    let me = device(1);
    let must_keep = edits(&trees);
    let start = show(&trees);
    let mut log = Vec::new();
    for round in 0..40 {
        let mut planned: Vec<(Action, Option<LocalEntry>)> = Vec::new();
        for path in all_paths(&trees) {
            let local = trees.local.get(&path).cloned();
            let synced = trees.synced.get(&path).cloned();
            let view = PathView {
                path: &path,
                local: local.as_ref(),
                synced: synced.as_ref(),
                remote: remote_of(&trees, &path),
                remote_at: &|other| remote_of(&trees, other),
            };
            for action in engine::plan_path(&view, FolderMode::SendReceive, &me) {
                planned.push((action, local.clone()));
            }
        }
        if planned.is_empty() {
            return verify(&trees, &must_keep).map(|()| round).map_err(|e| {
                format!(
                    "{e}\nstart:\n{start}\nactions:\n  {}\nend:\n{}",
                    log.join("\n  "),
                    show(&trees)
                )
            });
        }
        rng.shuffle(&mut planned);
        for (action, local) in planned {
            log.push(format!("round {round}: {}", show_action(&action)));
            apply(&mut trees, action, local.as_ref(), me);
        }
    }
    Err(format!(
        "still planning after 40 rounds\nstart:\n{start}\nnow:\n{}",
        show(&trees)
    ))
}

fn parents_ok(trees: &Trees, path: &RelPath) -> bool {
    let mut at = path.parent();
    while let Some(dir) = at {
        if let Some(local) = trees.local.get(&dir)
            && local.kind != EntryKind::Directory
        {
            return false;
        }
        at = dir.parent();
    }
    true
}

fn make_parents(trees: &mut Trees, path: &RelPath) {
    let mut at = path.parent();
    while let Some(dir) = at {
        trees
            .local
            .entry(dir.clone())
            .or_insert_with(directory_entry);
        at = dir.parent();
    }
}

fn children(trees: &Trees, path: &RelPath) -> Vec<RelPath> {
    trees
        .local
        .keys()
        .filter(|p| *p != path && p.starts_with(path))
        .cloned()
        .collect()
}

/// Carries one action out the way the node's shell does, with its checks.
fn apply(trees: &mut Trees, action: Action, planned_local: Option<&LocalEntry>, me: DeviceId) {
    let unchanged = |trees: &Trees, path: &RelPath, expected: Option<&LocalEntry>| {
        engine::disk_unchanged(trees.local.get(path), expected)
    };
    match action {
        Action::MarkSynced { path, entry, local } => {
            trees.synced.insert(path, SyncedEntry { entry, local });
        }
        Action::Publish { path } => {
            let entry = match planned_local {
                Some(local) => {
                    let manifest = local
                        .manifest
                        .and_then(|m| trees.manifests.get(&m))
                        .cloned();
                    publish_entry(local, manifest.as_ref(), me)
                }
                None => match trees.remote.get(&path).and_then(|v| v.first()) {
                    Some(current) if !current.deleted => engine::tombstone(current, 9_000, me),
                    _ => return,
                },
            };
            trees.remote.insert(path.clone(), vec![entry.clone()]);
            trees.synced.insert(
                path,
                SyncedEntry {
                    entry,
                    local: planned_local.cloned(),
                },
            );
        }
        Action::Resolve {
            path,
            winner,
            copies,
        } => {
            trees.remote.insert(path, vec![winner]);
            for (copy, entry) in copies {
                trees.remote.insert(copy, vec![entry]);
            }
        }
        Action::Apply {
            path,
            entry,
            expected,
        } => {
            if !parents_ok(trees, &path) || !unchanged(trees, &path, expected.as_ref()) {
                return;
            }
            make_parents(trees, &path);
            trees.next_inode += 1;
            let local = LocalEntry {
                kind: entry.kind,
                size: entry.size,
                mtime_ns: if entry.kind == EntryKind::Directory {
                    0
                } else {
                    entry.mtime_ns
                },
                mode: entry.mode,
                inode: if entry.kind == EntryKind::Directory {
                    0
                } else {
                    trees.next_inode
                },
                manifest: entry.content.manifest_hash(),
                symlink_target: None,
            };
            if entry.kind == EntryKind::Directory
                && trees
                    .local
                    .get(&path)
                    .is_some_and(|l| l.kind == EntryKind::Directory)
            {
                return;
            }
            trees.local.insert(path, local);
        }
        Action::Remove { path, expected, .. } => {
            if !parents_ok(trees, &path) || !unchanged(trees, &path, Some(&expected)) {
                return;
            }
            if expected.kind == EntryKind::Directory && !children(trees, &path).is_empty() {
                // The shell publishes a kept directory again if a child stays.
                let kept = children(trees, &path).iter().any(
                    |child| !matches!(remote_of(trees, child), Remote::Value(ref e) if e.deleted),
                );
                if kept && let Some(local) = planned_local {
                    let entry = publish_entry(local, None, me);
                    trees.remote.insert(path.clone(), vec![entry.clone()]);
                    trees.synced.insert(
                        path,
                        SyncedEntry {
                            entry,
                            local: Some(local.clone()),
                        },
                    );
                }
                return;
            }
            trees.local.remove(&path);
        }
        Action::MoveToConflictCopy { path, to, expected } => {
            if !parents_ok(trees, &path) || !unchanged(trees, &path, Some(&expected)) {
                return;
            }
            // As the shell does: a taken name gets a number.
            let planned = to.clone();
            let mut to = to;
            let mut n = 2;
            while trees.local.contains_key(&to) {
                match engine::numbered_copy_path(&planned, n) {
                    Some(next) => to = next,
                    None => return,
                }
                n += 1;
            }
            let moved: Vec<RelPath> = trees
                .local
                .keys()
                .filter(|p| p.starts_with(&path))
                .cloned()
                .collect();
            for old in moved {
                if let Some(entry) = trees.local.remove(&old) {
                    let suffix = &old.as_str()[path.as_str().len()..];
                    if let Ok(new) = RelPath::new(&format!("{to}{suffix}")) {
                        trees.local.insert(new, entry);
                    }
                }
            }
        }
        Action::KeepLocal { .. } => {}
    }
}

fn verify(trees: &Trees, must_keep: &BTreeSet<ManifestHash>) -> Result<(), String> {
    for path in all_paths(trees) {
        let values = trees.remote.get(&path).cloned().unwrap_or_default();
        if values.len() > 1 {
            return Err(format!("{path}: still concurrent values"));
        }
        let remote = values.first();
        let local = trees.local.get(&path);
        if !local_matches(local, remote) {
            return Err(format!(
                "{path}: disk {local:?} does not match the document {remote:?}"
            ));
        }
        if let Some(remote) = remote {
            let synced = trees.synced.get(&path);
            if !synced.is_some_and(|s| engine::same_content(Some(&s.entry), Some(remote))) {
                return Err(format!(
                    "{path}: synced {synced:?} is not the document's {remote:?}"
                ));
            }
        }
    }
    let on_disk: BTreeSet<ManifestHash> = trees.local.values().filter_map(|l| l.manifest).collect();
    if let Some(lost) = must_keep.iter().find(|h| !on_disk.contains(h)) {
        return Err(format!("an edit was lost: {}", &lost.to_hex()[..12]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planner_converges_and_keeps_every_edit() {
        let mut rounds = BTreeMap::new();
        for seed in 0..3_000 {
            match check_case(seed) {
                Ok(round) => *rounds.entry(round).or_insert(0) += 1,
                Err(error) => panic!("planner case {seed}: {error}"),
            }
        }
        // The check is not vacuous: most cases need work, some need several rounds.
        assert!(rounds.get(&0).copied().unwrap_or(0) < 300, "{rounds:?}");
        assert!(rounds.keys().any(|r| *r >= 3), "{rounds:?}");
    }
}
