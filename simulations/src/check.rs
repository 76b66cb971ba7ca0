//! The invariants, checked against the world.
//!
//! 1. **Convergence** ([`converged`]): after healing and quiet, every device's tree
//!    (names, kinds, contents, file modes, conflict copies included) and document are
//!    identical.
//! 2. **Nothing lost** ([`nothing_lost`]): every version a user wrote (the write
//!    succeeded) and that no user deleted or overwrote is at the end a file on some
//!    device (at any path: a conflict copy counts), whether or not any scan saw it.
//!    Version stores do not count: a version kept only there is gone from the folder,
//!    which is what users see (when they counted, two bugs that superseded a version
//!    without a copy went unseen: seeds 40 and 200 in docs/simulation.md). When only
//!    versions a store had recorded counted, a write the scanner never saw (racily
//!    clean, [`crate::disk`]'s coarse timestamps) and a remote change then replaced
//!    went unseen.
//! 3. **No corruption** ([`every_step`]): every visible file, at every step, holds a
//!    complete version some user wrote; temp files never enter a store's local tree.
//! 4. **Termination**: checked by the world's settle phase.
//! 5. **Safety** ([`every_step`]): no operation ever ran through a symlink (outside the
//!    folder), and nothing from the unaccepted intruder reaches any device.
//! 6. **Permissions**: no edit by a device without `edit` at its point in history is
//!    ever on an honest device's disk (the view-only device's forged edits, checked
//!    at every step: [`every_step`]), and at the end none the removed device made
//!    after its removal ([`revocation_held`]; one made before it knew, concurrently,
//!    may show until the removal arrives, then it is void).

use std::collections::BTreeMap;

use weft_protocol::ManifestHash;

use crate::disk::{Node, is_temp};
use crate::executor::manifest_of;
use crate::world::World;

/// An invariant that failed, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}

impl Violation {
    /// A violation of `invariant`.
    pub fn new(invariant: &'static str, detail: String) -> Self {
        Self { invariant, detail }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

/// What a device's folder looks like to its user, for comparison.
fn tree(world: &World, index: usize) -> BTreeMap<String, String> {
    world.devices[index]
        .disk
        .nodes()
        .filter(|(path, _)| !is_temp(path))
        .map(|(path, node)| {
            let what = match node {
                Node::File { data, mode, .. } => {
                    format!(
                        "file {} {:o}",
                        manifest_of(data).hash().to_hex(),
                        mode & 0o777
                    )
                }
                Node::Dir => "dir".to_owned(),
                Node::Symlink { target, .. } => format!("symlink {target}"),
            };
            (path.clone(), what)
        })
        .collect()
}

/// Invariants 3 and 5, after every event.
pub fn every_step(world: &World) -> Result<(), Violation> {
    let intruder = world.intruder_content();
    let vandal = world.vandal_content();
    for device in &world.devices {
        if let Some(path) = device.disk.escapes.first() {
            return Err(Violation::new(
                "safety",
                format!(
                    "dev{} wrote through a symlink at {path} (outside the folder)",
                    device.index
                ),
            ));
        }
        for (path, node) in device.disk.nodes() {
            if is_temp(path) {
                continue;
            }
            if let Node::File { data, .. } = node {
                let hash = manifest_of(data).hash();
                if hash == vandal {
                    return Err(Violation::new(
                        "permissions",
                        format!(
                            "dev{} holds the view-only device's forged edit at {path}",
                            device.index
                        ),
                    ));
                }
                if hash == intruder {
                    return Err(Violation::new(
                        "safety",
                        format!(
                            "dev{} holds the unaccepted intruder's file at {path}",
                            device.index
                        ),
                    ));
                }
                if !world.versions.contains_key(&hash) {
                    return Err(Violation::new(
                        "no corruption",
                        format!(
                            "dev{} shows {path} with {} bytes that are no version any user wrote",
                            device.index,
                            data.len()
                        ),
                    ));
                }
            }
        }
        if let Some(path) = device.store.local.keys().find(|p| is_temp(p.as_str())) {
            return Err(Violation::new(
                "no corruption",
                format!(
                    "dev{} recorded the temp file {path} as a user file",
                    device.index
                ),
            ));
        }
    }
    Ok(())
}

/// Invariant 6, once quiet: no honest device holds an edit the removed device made
/// after its removal (void or refused everywhere), and no honest device's document
/// shows the view-only device's forged edits (whose bytes exist nowhere, so a device
/// that took one waits for them forever rather than showing them).
pub fn revocation_held(world: &mut World) -> Result<(), Violation> {
    let vandal = world.vandal_content();
    let removed = world.removed();
    for device in &mut world.devices {
        if Some(device.index) == removed {
            continue;
        }
        let index = device.index;
        let Some(document) = device.document() else {
            continue;
        };
        let shown = document.entries().filter_map(Result::ok).find(|entry| {
            entry
                .entry
                .as_ref()
                .is_ok_and(|e| !e.deleted && e.content.manifest_hash() == Some(vandal))
        });
        if let Some(entry) = shown {
            return Err(Violation::new(
                "permissions",
                format!(
                    "dev{index}'s document shows the view-only device's forged edit at {}",
                    entry.path
                ),
            ));
        }
    }
    let revoked = world.revoked_content();
    for device in &world.devices {
        if Some(device.index) == world.removed() {
            continue;
        }
        for (path, node) in device.disk.nodes() {
            if let Node::File { data, .. } = node
                && !is_temp(path)
                && manifest_of(data).hash() == revoked
            {
                return Err(Violation::new(
                    "permissions",
                    format!(
                        "dev{} holds an edit the removed device made after its removal, at {path}",
                        device.index
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Invariant 1, once quiet (the removed device left the folder: it is not compared).
/// Once a device was removed or demoted, a path may wait on every device for a
/// version nobody holds: one only the removed device held, or one a void change had
/// overwritten (its author's user replaced it before anyone fetched it, and the void
/// change that replaced it no longer counts). Such paths, the failed downloads of the
/// devices compared, are not compared: each shows what it had.
pub fn converged(world: &mut World) -> Result<(), Violation> {
    let waiting: std::collections::BTreeSet<String> = if world.roles_changed() {
        let removed = world.removed();
        world
            .devices
            .iter()
            .filter(|d| Some(d.index) != removed)
            .flat_map(|d| d.failed())
            .map(|path| path.to_string())
            .collect()
    } else {
        Default::default()
    };
    let first = tree(world, 0);
    for index in 1..world.devices.len() {
        if Some(index) == world.removed() {
            continue;
        }
        let mut other = tree(world, index);
        // A receive-only device keeps its local changes (listed in its status): they
        // are not expected anywhere else. Its user makes none, but the node itself can
        // leave one: a directory made for a download whose version was deleted while
        // it ran.
        let mut first = first.clone();
        other.retain(|path, _| !waiting.contains(path));
        first.retain(|path, _| !waiting.contains(path));
        for kept in world.devices[index].local_only() {
            let kept = kept.as_str();
            let under = format!("{kept}/");
            other.retain(|path, _| path != kept && !path.starts_with(&under));
            first.retain(|path, _| path != kept && !path.starts_with(&under));
        }
        if other != first {
            let differences: Vec<String> = first
                .keys()
                .chain(other.keys())
                .filter(|path| first.get(*path) != other.get(*path))
                .take(6)
                .map(|path| {
                    format!(
                        "{path}: dev0 {:?} / dev{index} {:?}",
                        first.get(path),
                        other.get(path)
                    )
                })
                .collect();
            return Err(Violation::new(
                "convergence",
                format!("trees differ: {}", differences.join("; ")),
            ));
        }
    }
    let mut heads = Vec::new();
    let removed = world.removed();
    for device in &mut world.devices {
        if Some(device.index) == removed {
            continue;
        }
        let mut h = device.document().map(|d| d.heads()).unwrap_or_default();
        h.sort();
        heads.push(h);
    }
    if heads.iter().any(|h| *h != heads[0]) {
        let shown: Vec<String> = heads
            .iter()
            .enumerate()
            .map(|(index, h)| {
                let short: Vec<String> = h.iter().map(|c| c.to_string()[..8].to_owned()).collect();
                format!("dev{index} {short:?}")
            })
            .collect();
        return Err(Violation::new(
            "convergence",
            format!(
                "the trees agree but the documents do not: heads {}",
                shown.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Invariant 2, at the end.
pub fn nothing_lost(world: &World) -> Result<(), Violation> {
    let mut present: std::collections::BTreeSet<ManifestHash> = Default::default();
    for device in &world.devices {
        for (path, node) in device.disk.nodes() {
            if let Node::File { data, .. } = node
                && !is_temp(path)
            {
                present.insert(manifest_of(data).hash());
            }
        }
    }
    for (hash, version) in &world.versions {
        if !version.discarded && !present.contains(hash) {
            return Err(Violation::new(
                "nothing lost",
                format!(
                    "the version of {} written on dev{} ({}) is in no device's folder",
                    version.origin.1,
                    version.origin.0,
                    &hash.to_hex()[..12]
                ),
            ));
        }
    }
    Ok(())
}
