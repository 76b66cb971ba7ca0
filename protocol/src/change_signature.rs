//! Signatures on folder document changes: every change is signed by the device that
//! made it, and a receiver checks the signature before it accepts the change.
//!
//! The transport authenticates the peer that *sends* a sync message, not the device
//! that *made* each change in it: changes travel along chains of devices (A-B-C), and
//! an automerge actor ID is just bytes anyone can put in a change. So each change
//! carries its author's signature over [`statement`] (the folder and the change hash),
//! and the author is the device whose key starts the change's actor ID
//! ([`crate::document::actor_device`]). A change hash covers the change's content and
//! its dependencies, so a signature vouches for exactly that change; signatures travel
//! beside the sync message ([`crate::wire::Message::ChangeSignatures`]) and are kept by
//! every device that accepts the change, so it can pass them on.
//!
//! Checking the author's *permission* (edit or view) is the sharing layer's job; this
//! module answers only "did that device make this change".

use automerge::{ActorId, ChangeHash};
use serde::{Deserialize, Serialize};

use crate::actor::actor_device;
use crate::folder::FolderId;
use crate::identity::{DeviceId, DeviceKey, Signature};

/// Domain separation for change signatures (never valid as any other Weft signature).
const STATEMENT_PREFIX: &[u8] = b"weft folder change v1\0";

/// The bytes a device signs for one change of one folder's document.
pub fn statement(folder: &FolderId, change: &ChangeHash) -> Vec<u8> {
    let folder = folder.as_str().as_bytes();
    let mut bytes = Vec::with_capacity(STATEMENT_PREFIX.len() + folder.len() + 1 + 32);
    bytes.extend_from_slice(STATEMENT_PREFIX);
    bytes.extend_from_slice(folder);
    bytes.push(0);
    bytes.extend_from_slice(&change.0);
    bytes
}

/// A change hash with its author's signature, as it travels and is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedChange {
    /// The automerge change hash.
    pub hash: [u8; 32],
    /// The author's signature over [`statement`].
    pub signature: Signature,
}

impl SignedChange {
    /// Signs `change` of `folder` as its author.
    pub fn sign(key: &DeviceKey, folder: &FolderId, change: &ChangeHash) -> Self {
        Self {
            hash: change.0,
            signature: key.sign(&statement(folder, change)),
        }
    }
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeSignatureError {
    /// The change's actor ID does not name a device.
    #[error("change {change} has an actor that is not a device ID")]
    NoAuthor {
        /// The change hash.
        change: ChangeHash,
    },
    /// No signature came with the change.
    #[error("change {change} by {author} came without a signature")]
    Unsigned {
        /// The change hash.
        change: ChangeHash,
        /// The device its actor names.
        author: DeviceId,
    },
    /// The signature is not the author's.
    #[error("change {change} is not signed by {author}, the device its actor names")]
    BadSignature {
        /// The change hash.
        change: ChangeHash,
        /// The device its actor names.
        author: DeviceId,
    },
}

/// Checks that every change in `changes` (hash and actor) is signed by the device its
/// actor names; `signature_of` looks a change's signature up. Returns the signatures to
/// keep, in the order of `changes`, or the first change that fails.
pub fn verify(
    folder: &FolderId,
    changes: &[(ChangeHash, ActorId)],
    signature_of: impl Fn(&[u8; 32]) -> Option<Signature>,
) -> Result<Vec<SignedChange>, ChangeSignatureError> {
    changes
        .iter()
        .map(|(change, actor)| {
            let author =
                actor_device(actor).ok_or(ChangeSignatureError::NoAuthor { change: *change })?;
            let signature = signature_of(&change.0).ok_or(ChangeSignatureError::Unsigned {
                change: *change,
                author,
            })?;
            author
                .verify(&statement(folder, change), &signature)
                .map_err(|_| ChangeSignatureError::BadSignature {
                    change: *change,
                    author,
                })?;
            Ok(SignedChange {
                hash: change.0,
                signature,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::actor::actor_id;

    fn folder() -> FolderId {
        "photos".parse().unwrap()
    }

    fn key(seed: u8) -> DeviceKey {
        DeviceKey::from_secret_bytes([seed; 32])
    }

    fn change(byte: u8) -> ChangeHash {
        ChangeHash([byte; 32])
    }

    fn signatures(signed: &[SignedChange]) -> HashMap<[u8; 32], Signature> {
        signed.iter().map(|s| (s.hash, s.signature)).collect()
    }

    fn lookup(map: &HashMap<[u8; 32], Signature>) -> impl Fn(&[u8; 32]) -> Option<Signature> + '_ {
        |hash| map.get(hash).copied()
    }

    #[test]
    fn changes_signed_by_their_authors_verify() {
        let (alice, bob) = (key(1), key(2));
        let changes = vec![
            (change(1), actor_id(&alice.device_id(), [0; 8])),
            (change(2), actor_id(&bob.device_id(), [7; 8])),
        ];
        let signed = vec![
            SignedChange::sign(&alice, &folder(), &change(1)),
            SignedChange::sign(&bob, &folder(), &change(2)),
        ];
        assert_eq!(
            verify(&folder(), &changes, lookup(&signatures(&signed))),
            Ok(signed)
        );
        assert_eq!(verify(&folder(), &[], |_| None), Ok(vec![]));
    }

    #[test]
    fn a_change_claiming_another_author_is_refused() {
        let (alice, mallory) = (key(1), key(3));
        // Mallory writes a change under Alice's actor and signs it herself.
        let changes = vec![(change(5), actor_id(&alice.device_id(), [0; 8]))];
        let forged = signatures(&[SignedChange::sign(&mallory, &folder(), &change(5))]);
        assert!(matches!(
            verify(&folder(), &changes, lookup(&forged)),
            Err(ChangeSignatureError::BadSignature { author, .. }) if author == alice.device_id()
        ));
    }

    #[test]
    fn unsigned_foreign_and_authorless_changes_are_refused() {
        let alice = key(1);
        let changes = vec![(change(1), actor_id(&alice.device_id(), [0; 8]))];
        assert!(matches!(
            verify(&folder(), &changes, |_| None),
            Err(ChangeSignatureError::Unsigned { .. })
        ));
        // Signed for another folder, or for another change: not valid here.
        let other_folder: FolderId = "music".parse().unwrap();
        let elsewhere = signatures(&[SignedChange::sign(&alice, &other_folder, &change(1))]);
        assert!(verify(&folder(), &changes, lookup(&elsewhere)).is_err());
        let mut wrong_change = SignedChange::sign(&alice, &folder(), &change(2));
        wrong_change.hash = change(1).0;
        assert!(verify(&folder(), &changes, lookup(&signatures(&[wrong_change]))).is_err());
        // An actor that is not a device ID has no author to check.
        let authorless = vec![(change(1), ActorId::from(vec![1u8, 2, 3]))];
        assert!(matches!(
            verify(&folder(), &authorless, |_| None),
            Err(ChangeSignatureError::NoAuthor { .. })
        ));
    }
}
