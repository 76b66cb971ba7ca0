//! The access list of a folder: who may read it, who may change its files, who may
//! change the list. It lives in the folder document (keys `"a/" + device ID`), so it
//! is signed change by change and replicated like the files, and every device checks
//! every change against it.
//!
//! **Roles**, from least to most: `view` (receives the folder), `edit` (also changes
//! files), `admin` (also adds and removes `view` and `edit` members), `owner` (also
//! makes and removes admins and owners). The *founder* is the device that created the
//! folder: its first change writes itself as owner, nobody can change its role, and
//! every device knows its ID from the invite it accepted, so a history founded by
//! anyone else is refused.
//!
//! **At that point in history.** A change is accepted only if its author's role *at
//! the change's dependencies* (the access list as its author had seen it) allowed
//! every write in it ([`may_set`], [`Role::can_edit`]). That is a property of the
//! change alone, the same on every device, so a refused change is refused everywhere.
//!
//! **Concurrent changes of the list** resolve to the *lowest* role among the values
//! no other value had seen (a removal beats a downgrade beats a grant): the same on
//! every device, whatever order changes arrive in, and the safe side.
//!
//! **Revocation beats concurrency.** A change made by a device concurrently with a
//! change that lowered that device below what the change needs (neither had seen the
//! other) is *void*: it stays in the history, so that changes built on it still apply,
//! but its writes are ignored by every device; so is a change that depended on a role
//! only a void change gave. A removed device therefore cannot slip edits in by
//! pretending not to have seen its removal. [`AccessLog`] computes the void set; it
//! is a function of the history alone.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::causality::{Causality, Clock};
use crate::identity::DeviceId;

/// Key prefix of access entries in the document's root map.
pub const ACCESS_PREFIX: &str = "a/";
/// The commit message of a change of the access list. A change either writes access
/// entries only, with this message, or file entries only, with another.
pub const ACCESS_MESSAGE: &str = "access";
/// Rounds of the void computation before it settles for the union of every round
/// (never reached by histories honest devices make; a bound against crafted ones).
pub const MAX_VOID_ROUNDS: usize = 8;

/// What a member may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Receives the folder; changes nothing.
    View,
    /// Also changes files.
    Edit,
    /// Also adds and removes `view` and `edit` members.
    Admin,
    /// Also makes and removes admins and owners.
    Owner,
}

impl Role {
    /// May change files.
    pub fn can_edit(self) -> bool {
        self >= Role::Edit
    }

    /// The name people type and read.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::View => "view",
            Role::Edit => "edit",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "view" => Ok(Role::View),
            "edit" => Ok(Role::Edit),
            "admin" => Ok(Role::Admin),
            "owner" => Ok(Role::Owner),
            other => Err(format!(
                "{other:?} is not a role; use view, edit, admin or owner"
            )),
        }
    }
}

/// The value of an access entry: a role, or `None` for a device removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessValue {
    /// The device's role; `None`: not a member (removed).
    pub role: Option<Role>,
}

impl AccessValue {
    /// Canonical bytes stored in the document.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a value from the document.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match postcard::take_from_bytes::<AccessValue>(bytes) {
            Ok((value, [])) => Some(value),
            _ => None,
        }
    }
}

/// The document key of a device's access entry.
pub fn access_key(device: &DeviceId) -> String {
    format!("{ACCESS_PREFIX}{device}")
}

/// The device an access key names.
pub fn key_device(key: &str) -> Option<DeviceId> {
    key.strip_prefix(ACCESS_PREFIX)?.parse().ok()
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The change writes files but its author could not.
    #[error(
        "change {change} by {author} writes files, but its author was {} at that point in the folder's history",
        role_text(*role)
    )]
    CannotEdit {
        /// The change.
        change: ChangeHash,
        /// Its author.
        author: DeviceId,
        /// The author's role at the change's dependencies.
        role: Option<Role>,
    },
    /// The change sets a role its author may not set.
    #[error("change {change} by {author} sets {target} to {}: {reason}", role_text(*to))]
    CannotSet {
        /// The change.
        change: ChangeHash,
        /// Its author.
        author: DeviceId,
        /// The device whose role it sets.
        target: DeviceId,
        /// The role it sets.
        to: Option<Role>,
        /// Why that is not allowed.
        reason: &'static str,
    },
    /// The change writes something outside the document's schema.
    #[error("change {change} by {author} writes outside the folder document's schema: {what}")]
    Schema {
        /// The change.
        change: ChangeHash,
        /// Its author.
        author: DeviceId,
        /// What it writes.
        what: String,
    },
    /// The change's actor is not a device, or the change is not in the document.
    #[error("change {change} has no author device or is not in the document")]
    NoAuthor {
        /// The change.
        change: ChangeHash,
    },
}

fn role_text(role: Option<Role>) -> &'static str {
    role.map_or("not a member", Role::as_str)
}

/// The access list at some point in a folder's history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessList {
    roles: BTreeMap<DeviceId, Role>,
}

impl AccessList {
    /// A device's role (`None`: not a member).
    pub fn role(&self, device: &DeviceId) -> Option<Role> {
        self.roles.get(device).copied()
    }

    /// Members and their roles, by device ID.
    pub fn members(&self) -> impl Iterator<Item = (DeviceId, Role)> + '_ {
        self.roles.iter().map(|(device, role)| (*device, *role))
    }

    /// True once the founder has written itself as owner.
    pub fn is_founded(&self) -> bool {
        !self.roles.is_empty()
    }

    fn set(&mut self, device: DeviceId, role: Option<Role>) {
        match role {
            Some(role) => self.roles.insert(device, role),
            None => self.roles.remove(&device),
        };
    }
}

/// Whether `author` may set `target`'s role to `to` in a folder founded by `founder`
/// whose access list is `list`; the reason if not.
pub fn may_set(
    list: &AccessList,
    founder: &DeviceId,
    author: &DeviceId,
    target: &DeviceId,
    to: Option<Role>,
) -> Result<(), &'static str> {
    if !list.is_founded() {
        return if author == founder && target == founder && to == Some(Role::Owner) {
            Ok(())
        } else {
            Err("the folder's history must begin with its founder writing itself as owner")
        };
    }
    if target == founder {
        return if to == Some(Role::Owner) && list.role(author) >= Some(Role::Owner) {
            Ok(())
        } else {
            Err("nobody can change the founder's role")
        };
    }
    let mine = list.role(author);
    let theirs = list.role(target);
    if author == target && mine.is_some() && to <= mine {
        // Anyone may step down or leave.
        return Ok(());
    }
    match mine {
        Some(Role::Owner) => Ok(()),
        Some(Role::Admin) if theirs <= Some(Role::Edit) && to <= Some(Role::Edit) => Ok(()),
        Some(Role::Admin) => Err("an admin sets only view and edit members"),
        _ => Err("only owners and admins change the access list"),
    }
}

/// The least role an author needs to set `target` to `to` (for the void rule).
fn needed_to_set(
    author: &DeviceId,
    target: &DeviceId,
    from: Option<Role>,
    to: Option<Role>,
) -> Role {
    if author == target && to <= from {
        Role::View
    } else if from <= Some(Role::Edit) && to <= Some(Role::Edit) {
        Role::Admin
    } else {
        Role::Owner
    }
}

/// One write of an access entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessWrite {
    /// The device whose role is set.
    pub target: DeviceId,
    /// The role set (`None`: removed).
    pub role: Option<Role>,
}

/// One change of the document, as the access log sees it.
#[derive(Clone, Debug)]
struct Change {
    hash: ChangeHash,
    author: DeviceId,
    deps: Vec<ChangeHash>,
    /// Access writes, in order; empty for a change of files.
    writes: Vec<AccessWrite>,
}

/// The access-relevant history of a document: every change's author and
/// dependencies, the access writes, and the void set.
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    causality: Causality,
    /// Every change, in causal order; access changes carry their writes.
    changes: Vec<Change>,
    by_hash: BTreeMap<ChangeHash, usize>,
    /// Indexes into `changes` of the changes that write access entries.
    access_changes: Vec<usize>,
    /// The changes no other change depends on.
    heads: BTreeSet<ChangeHash>,
    void: BTreeSet<ChangeHash>,
}

impl AccessLog {
    /// Records a change already in the document (dependencies first). False if a
    /// dependency was never recorded.
    pub fn record(
        &mut self,
        hash: ChangeHash,
        actor: &automerge::ActorId,
        seq: u64,
        deps: &[ChangeHash],
        writes: Vec<AccessWrite>,
    ) -> bool {
        if self.by_hash.contains_key(&hash) {
            return true;
        }
        let Some(author) = crate::actor::actor_device(actor) else {
            return false;
        };
        if !self.causality.add(hash, actor, seq, deps) {
            return false;
        }
        let index = self.changes.len();
        if !writes.is_empty() {
            self.access_changes.push(index);
        }
        self.by_hash.insert(hash, index);
        for dep in deps {
            self.heads.remove(dep);
        }
        self.heads.insert(hash);
        self.changes.push(Change {
            hash,
            author,
            deps: deps.to_vec(),
            writes,
        });
        true
    }

    /// The causal order of the recorded changes.
    pub fn causality(&self) -> &Causality {
        &self.causality
    }

    /// True if the change is void (its writes are ignored).
    pub fn is_void(&self, change: &ChangeHash) -> bool {
        self.void.contains(change)
    }

    /// The void changes.
    pub fn void(&self) -> &BTreeSet<ChangeHash> {
        &self.void
    }

    /// The access list at `heads` (the list a change with these dependencies saw),
    /// void changes left out.
    pub fn list_at(&self, heads: &[ChangeHash]) -> AccessList {
        match self.causality.clock_of(heads) {
            Some(clock) => self.list_within(&clock, &self.void),
            None => AccessList::default(),
        }
    }

    /// The access list in the history `clock` describes, without the changes in
    /// `void`: for each device, the writes of its entry no other such write had seen
    /// (a later write in the same change replaces an earlier one); the lowest wins.
    fn list_within(&self, clock: &Clock, void: &BTreeSet<ChangeHash>) -> AccessList {
        // (change index, write index) of the candidate writes per target.
        let mut current: BTreeMap<DeviceId, Vec<(usize, usize)>> = BTreeMap::new();
        for &index in &self.access_changes {
            let change = &self.changes[index];
            if void.contains(&change.hash) || !self.causality.within(clock, &change.hash) {
                continue;
            }
            for (position, write) in change.writes.iter().enumerate() {
                let writes = current.entry(write.target).or_default();
                // Drop what this write had seen; keep it unless a kept one saw it.
                writes.retain(|(other, other_position)| {
                    let seen = if *other == index {
                        other_position < &position
                    } else {
                        self.causality.saw(&change.hash, &self.changes[*other].hash)
                    };
                    !seen
                });
                let overtaken = writes.iter().any(|(other, _)| {
                    *other != index && self.causality.saw(&self.changes[*other].hash, &change.hash)
                });
                if !overtaken {
                    writes.push((index, position));
                }
            }
        }
        let mut list = AccessList::default();
        for (target, writes) in current {
            let lowest = writes
                .iter()
                .map(|(index, position)| self.changes[*index].writes[*position].role)
                .min()
                .flatten();
            list.set(target, lowest);
        }
        list
    }

    /// Checks a change just recorded: its author's role at its dependencies must allow
    /// every write in it. `writes_files` says whether it writes file entries.
    pub fn check(
        &self,
        hash: &ChangeHash,
        founder: &DeviceId,
        writes_files: bool,
    ) -> Result<(), AccessError> {
        let change = self
            .by_hash
            .get(hash)
            .and_then(|index| self.changes.get(*index))
            .ok_or(AccessError::NoAuthor { change: *hash })?;
        let mut list = self.list_at(&change.deps);
        if writes_files {
            let role = list.role(&change.author);
            if !role.is_some_and(Role::can_edit) {
                return Err(AccessError::CannotEdit {
                    change: *hash,
                    author: change.author,
                    role,
                });
            }
        }
        for write in &change.writes {
            may_set(&list, founder, &change.author, &write.target, write.role).map_err(
                |reason| AccessError::CannotSet {
                    change: *hash,
                    author: change.author,
                    target: write.target,
                    to: write.role,
                    reason,
                },
            )?;
            list.set(write.target, write.role);
        }
        Ok(())
    }

    /// Computes the void set again (after new changes); returns the changes whose
    /// status changed (their writes appear or disappear).
    pub fn settle(&mut self) -> BTreeSet<ChangeHash> {
        let before = std::mem::take(&mut self.void);
        let mut void = BTreeSet::new();
        let mut seen_rounds: Vec<BTreeSet<ChangeHash>> = Vec::new();
        for _ in 0..MAX_VOID_ROUNDS {
            let next = self.void_round(&void);
            if next == void {
                break;
            }
            seen_rounds.push(next.clone());
            void = next;
        }
        if seen_rounds.len() >= MAX_VOID_ROUNDS {
            void = seen_rounds.into_iter().flatten().collect();
        }
        self.void = void;
        before.symmetric_difference(&self.void).copied().collect()
    }

    /// One round: with `void` left out, the downgrades (writes that lower a member's
    /// role) and, for each device lowered or raised by a void change, its changes
    /// that are void: made concurrently with a downgrade below what they need, or
    /// by an author whose role at their dependencies no longer allows them.
    fn void_round(&self, void: &BTreeSet<ChangeHash>) -> BTreeSet<ChangeHash> {
        if self.access_changes.len() <= 1 && void.is_empty() {
            return BTreeSet::new();
        }
        // Downgrades: (change, target, new role).
        let mut downgrades: Vec<(ChangeHash, DeviceId, Option<Role>)> = Vec::new();
        let mut suspects: BTreeSet<DeviceId> = BTreeSet::new();
        for &index in &self.access_changes {
            let change = &self.changes[index];
            let Some(clock) = self.causality.clock_of(&change.deps) else {
                continue;
            };
            let list = self.list_within(&clock, void);
            for write in &change.writes {
                if void.contains(&change.hash) {
                    suspects.insert(write.target);
                } else if write.role < list.role(&write.target) {
                    downgrades.push((change.hash, write.target, write.role));
                    suspects.insert(write.target);
                }
            }
        }
        let mut next = BTreeSet::new();
        if suspects.is_empty() {
            return next;
        }
        for change in &self.changes {
            if !suspects.contains(&change.author) {
                continue;
            }
            let Some(clock) = self.causality.clock_of(&change.deps) else {
                continue;
            };
            let list = self.list_within(&clock, void);
            let had = list.role(&change.author);
            let needs = if change.writes.is_empty() {
                Role::Edit
            } else {
                let mut list = list.clone();
                let mut needs = Role::View;
                for write in &change.writes {
                    let from = list.role(&write.target);
                    needs = needs.max(needed_to_set(
                        &change.author,
                        &write.target,
                        from,
                        write.role,
                    ));
                    list.set(write.target, write.role);
                }
                needs
            };
            let lost = had < Some(needs);
            let overtaken = downgrades.iter().any(|(downgrade, target, role)| {
                *target == change.author
                    && *role < Some(needs)
                    && *downgrade != change.hash
                    && self.causality.concurrent(downgrade, &change.hash)
            });
            if lost || overtaken {
                next.insert(change.hash);
            }
        }
        next
    }

    /// The access list at the log's current end (every change recorded).
    pub fn current(&self) -> AccessList {
        let heads: Vec<ChangeHash> = self.heads.iter().copied().collect();
        self.list_at(&heads)
    }

    /// The dependencies of a recorded change.
    pub fn deps(&self, change: &ChangeHash) -> Option<&[ChangeHash]> {
        let index = self.by_hash.get(change)?;
        self.changes.get(*index).map(|c| c.deps.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceKey;

    fn device(seed: u8) -> DeviceId {
        DeviceKey::from_secret_bytes([seed; 32]).device_id()
    }

    fn list(roles: &[(DeviceId, Role)]) -> AccessList {
        let mut list = AccessList::default();
        for (device, role) in roles {
            list.set(*device, Some(*role));
        }
        list
    }

    #[test]
    fn who_may_set_what() {
        let (founder, owner, admin, editor, viewer, stranger) = (
            device(1),
            device(2),
            device(3),
            device(4),
            device(5),
            device(6),
        );
        // An empty list: only the founder, writing itself as owner.
        let empty = AccessList::default();
        assert!(may_set(&empty, &founder, &founder, &founder, Some(Role::Owner)).is_ok());
        assert!(may_set(&empty, &founder, &stranger, &stranger, Some(Role::Owner)).is_err());
        assert!(may_set(&empty, &founder, &founder, &editor, Some(Role::Edit)).is_err());
        let list = list(&[
            (founder, Role::Owner),
            (owner, Role::Owner),
            (admin, Role::Admin),
            (editor, Role::Edit),
            (viewer, Role::View),
        ]);
        let set =
            |author: &DeviceId, target: &DeviceId, to| may_set(&list, &founder, author, target, to);
        assert!(set(&owner, &admin, None).is_ok());
        assert!(set(&owner, &stranger, Some(Role::Owner)).is_ok());
        assert!(
            set(&owner, &founder, None).is_err(),
            "nobody removes the founder"
        );
        assert!(set(&admin, &stranger, Some(Role::Edit)).is_ok());
        assert!(set(&admin, &editor, None).is_ok());
        assert!(set(&admin, &viewer, Some(Role::Admin)).is_err());
        assert!(set(&admin, &owner, None).is_err());
        assert!(set(&editor, &viewer, Some(Role::Edit)).is_err());
        assert!(
            set(&viewer, &viewer, Some(Role::Edit)).is_err(),
            "no raising oneself"
        );
        assert!(
            set(&editor, &editor, Some(Role::View)).is_ok(),
            "stepping down"
        );
        assert!(set(&viewer, &viewer, None).is_ok(), "leaving");
        assert!(set(&stranger, &stranger, None).is_err());
    }

    fn actor(device: &DeviceId) -> automerge::ActorId {
        crate::actor::actor_id(device, [0; 8])
    }

    fn hash(byte: u8) -> ChangeHash {
        ChangeHash([byte; 32])
    }

    fn grant(target: DeviceId, role: Option<Role>) -> Vec<AccessWrite> {
        vec![AccessWrite { target, role }]
    }

    /// founder F founds (1) and grants X edit (2); then F removes X (3) while X,
    /// not having seen it, edits (4); X also edits after its grant but before the
    /// removal, seen by it (5 <- 3 depends on 5).
    #[test]
    fn a_change_concurrent_with_its_authors_removal_is_void() {
        let (f, x) = (device(1), device(2));
        let mut log = AccessLog::default();
        assert!(log.record(hash(1), &actor(&f), 1, &[], grant(f, Some(Role::Owner))));
        assert!(log.check(&hash(1), &f, false).is_ok());
        assert!(log.record(
            hash(2),
            &actor(&f),
            2,
            &[hash(1)],
            grant(x, Some(Role::Edit))
        ));
        assert!(log.check(&hash(2), &f, false).is_ok());
        assert!(log.record(hash(5), &actor(&x), 1, &[hash(2)], vec![]));
        assert!(log.check(&hash(5), &f, true).is_ok());
        assert!(log.record(hash(3), &actor(&f), 3, &[hash(5)], grant(x, None)));
        assert!(log.check(&hash(3), &f, false).is_ok());
        assert!(log.record(hash(4), &actor(&x), 2, &[hash(5)], vec![]));
        // At its dependencies X could edit: accepted.
        assert!(log.check(&hash(4), &f, true).is_ok());
        let changed = log.settle();
        assert_eq!(changed, BTreeSet::from([hash(4)]));
        assert!(log.is_void(&hash(4)));
        assert!(!log.is_void(&hash(5)), "seen by the removal: kept");
        assert_eq!(log.current().role(&x), None);
        // After its removal, X's change is refused outright.
        assert!(log.record(hash(6), &actor(&x), 3, &[hash(3), hash(4)], vec![]));
        assert!(matches!(
            log.check(&hash(6), &f, true),
            Err(AccessError::CannotEdit { role: None, .. })
        ));
    }

    #[test]
    fn concurrent_grants_resolve_to_the_lowest_role_and_void_grants_cascade() {
        let (f, a, x, y) = (device(1), device(2), device(3), device(4));
        let mut log = AccessLog::default();
        log.record(hash(1), &actor(&f), 1, &[], grant(f, Some(Role::Owner)));
        log.record(
            hash(2),
            &actor(&f),
            2,
            &[hash(1)],
            grant(a, Some(Role::Admin)),
        );
        // F makes X edit; A concurrently makes X view: X is view everywhere.
        log.record(
            hash(3),
            &actor(&f),
            3,
            &[hash(2)],
            grant(x, Some(Role::Edit)),
        );
        log.record(
            hash(4),
            &actor(&a),
            1,
            &[hash(2)],
            grant(x, Some(Role::View)),
        );
        assert_eq!(log.list_at(&[hash(3), hash(4)]).role(&x), Some(Role::View));
        assert_eq!(log.list_at(&[hash(3)]).role(&x), Some(Role::Edit));
        // F removes A while A, unaware, grants Y edit, and Y edits: both void.
        log.record(hash(5), &actor(&f), 4, &[hash(3), hash(4)], grant(a, None));
        log.record(
            hash(6),
            &actor(&a),
            2,
            &[hash(4)],
            grant(y, Some(Role::Edit)),
        );
        log.record(hash(7), &actor(&y), 1, &[hash(6)], vec![]);
        for change in [5, 6, 7] {
            assert!(
                log.check(&hash(change), &f, change == 7).is_ok(),
                "{change}"
            );
        }
        log.settle();
        assert!(log.is_void(&hash(6)));
        assert!(log.is_void(&hash(7)));
        assert!(!log.is_void(&hash(5)));
        let now = log.current();
        assert_eq!(now.role(&y), None);
        assert_eq!(now.role(&a), None);
        // A history founded by someone else is refused.
        let mut other = AccessLog::default();
        other.record(hash(9), &actor(&x), 1, &[], grant(x, Some(Role::Owner)));
        assert!(other.check(&hash(9), &f, false).is_err());
    }
}
