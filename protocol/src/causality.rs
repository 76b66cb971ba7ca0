//! Which change of a folder document had seen which: a vector clock per change.
//!
//! The access list is evaluated "at a point in history" (the dependencies of a change,
//! `crate::access`), and a change made concurrently with its author's revocation is
//! void; both ask whether one change is in the causal past of another. automerge keeps
//! such clocks internally but does not expose them, so this keeps its own: for each
//! change, the highest sequence number of every actor it had seen. Changes are added
//! in causal order (automerge only applies a change once its dependencies are present);
//! one that names an unknown dependency is refused, which [`Causality::add`] reports.

use std::collections::BTreeMap;

use automerge::{ActorId, ChangeHash};

/// One change: its actor (index), its sequence number, and its clock.
#[derive(Clone, Debug)]
struct Node {
    actor: usize,
    seq: u64,
    /// Highest sequence number seen per actor index (missing tail: 0), this change
    /// included.
    clock: Vec<u64>,
}

/// A clock: for each actor index, the highest sequence number seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clock(Vec<u64>);

impl Clock {
    fn merge(&mut self, other: &[u64]) {
        if self.0.len() < other.len() {
            self.0.resize(other.len(), 0);
        }
        for (mine, theirs) in self.0.iter_mut().zip(other) {
            *mine = (*mine).max(*theirs);
        }
    }

    fn get(&self, actor: usize) -> u64 {
        self.0.get(actor).copied().unwrap_or(0)
    }
}

/// The causal order of a document's changes.
#[derive(Clone, Debug, Default)]
pub struct Causality {
    index: BTreeMap<ChangeHash, usize>,
    nodes: Vec<Node>,
    actors: BTreeMap<ActorId, usize>,
    /// Actor IDs by index.
    actor_ids: Vec<ActorId>,
}

impl Causality {
    /// Records a change after its dependencies. False (and nothing recorded) if a
    /// dependency is unknown; true if recorded or already known.
    pub fn add(
        &mut self,
        hash: ChangeHash,
        actor: &ActorId,
        seq: u64,
        deps: &[ChangeHash],
    ) -> bool {
        if self.index.contains_key(&hash) {
            return true;
        }
        let Some(clock) = self.clock_of(deps) else {
            return false;
        };
        let actor = match self.actors.get(actor) {
            Some(index) => *index,
            None => {
                let index = self.actor_ids.len();
                self.actors.insert(actor.clone(), index);
                self.actor_ids.push(actor.clone());
                index
            }
        };
        let mut clock = clock.0;
        if clock.len() <= actor {
            clock.resize(actor + 1, 0);
        }
        clock[actor] = clock[actor].max(seq);
        self.index.insert(hash, self.nodes.len());
        self.nodes.push(Node { actor, seq, clock });
        true
    }

    /// True if the change is recorded.
    pub fn contains(&self, hash: &ChangeHash) -> bool {
        self.index.contains_key(hash)
    }

    /// The clock of a set of heads (what a change with these dependencies had seen);
    /// `None` if one of them is unknown.
    pub fn clock_of(&self, heads: &[ChangeHash]) -> Option<Clock> {
        let mut clock = Clock::default();
        for head in heads {
            let node = self.nodes.get(*self.index.get(head)?)?;
            clock.merge(&node.clock);
        }
        Some(clock)
    }

    /// True if `change` is in the history `clock` describes (included in it).
    pub fn within(&self, clock: &Clock, change: &ChangeHash) -> bool {
        self.node(change)
            .is_some_and(|node| clock.get(node.actor) >= node.seq)
    }

    /// True if `earlier` is `later` or in its causal past.
    pub fn saw(&self, later: &ChangeHash, earlier: &ChangeHash) -> bool {
        match (self.node(later), self.node(earlier)) {
            (Some(later), Some(earlier)) => {
                later.clock.get(earlier.actor).copied().unwrap_or(0) >= earlier.seq
            }
            _ => false,
        }
    }

    /// True if neither change had seen the other.
    pub fn concurrent(&self, a: &ChangeHash, b: &ChangeHash) -> bool {
        !self.saw(a, b) && !self.saw(b, a)
    }

    /// The actor of a recorded change.
    pub fn actor(&self, change: &ChangeHash) -> Option<&ActorId> {
        self.node(change)
            .and_then(|node| self.actor_ids.get(node.actor))
    }

    /// Every recorded change, in the order recorded (causal).
    pub fn changes(&self) -> impl Iterator<Item = (&ChangeHash, &ActorId)> + '_ {
        let mut ordered: Vec<(&ChangeHash, usize)> = self
            .index
            .iter()
            .map(|(hash, index)| (hash, *index))
            .collect();
        ordered.sort_by_key(|(_, index)| *index);
        ordered.into_iter().filter_map(|(hash, index)| {
            let node = self.nodes.get(index)?;
            Some((hash, self.actor_ids.get(node.actor)?))
        })
    }

    /// Number of changes recorded.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if no change is recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn node(&self, change: &ChangeHash) -> Option<&Node> {
        self.nodes.get(*self.index.get(change)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(byte: u8) -> ChangeHash {
        ChangeHash([byte; 32])
    }

    #[test]
    fn clocks_tell_past_from_concurrent() {
        let (a, b) = (ActorId::from(vec![1u8]), ActorId::from(vec![2u8]));
        let mut causality = Causality::default();
        assert!(causality.add(hash(1), &a, 1, &[]));
        assert!(causality.add(hash(2), &b, 1, &[hash(1)]));
        assert!(causality.add(hash(3), &a, 2, &[hash(1)]));
        assert!(causality.add(hash(4), &b, 2, &[hash(2), hash(3)]));
        // Unknown dependency: refused, nothing recorded.
        assert!(!causality.add(hash(9), &a, 3, &[hash(8)]));
        assert!(!causality.contains(&hash(9)));
        assert!(causality.saw(&hash(2), &hash(1)));
        assert!(causality.saw(&hash(4), &hash(3)));
        assert!(causality.saw(&hash(3), &hash(3)));
        assert!(!causality.saw(&hash(1), &hash(2)));
        assert!(causality.concurrent(&hash(2), &hash(3)));
        assert!(!causality.concurrent(&hash(4), &hash(1)));
        let clock = causality.clock_of(&[hash(2)]).unwrap();
        assert!(causality.within(&clock, &hash(1)));
        assert!(!causality.within(&clock, &hash(3)));
        let order: Vec<ChangeHash> = causality.changes().map(|(h, _)| *h).collect();
        assert_eq!(order, vec![hash(1), hash(2), hash(3), hash(4)]);
    }
}
