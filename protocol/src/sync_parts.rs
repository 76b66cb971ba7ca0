//! Sync messages larger than a frame: split into parts, reassembled under a limit.
//!
//! automerge puts every change a peer lacks into one sync message, so the first sync
//! of a large folder to a new device can exceed a frame. The sender cuts such a
//! message into [`Message::DocSyncPart`] frames of at most [`MAX_DOC_SYNC_LEN`] bytes
//! and ends it with an ordinary [`Message::DocSync`]; a message that fits is one
//! `DocSync`, exactly as before. Frames of one stream arrive in order, so the receiver
//! appends parts per (peer, folder) and hands on the whole message when the final
//! frame arrives.
//!
//! **Invariant:** a [`SyncAssembly`] never holds more than [`MAX_DOC_SYNC_TOTAL_LEN`]
//! bytes; a peer that sends more loses its partial message (and only that).

use crate::folder::FolderId;
use crate::wire::{DocSync, MAX_DOC_SYNC_LEN, MAX_DOC_SYNC_TOTAL_LEN, Message, WireError};

/// The frames that carry `sync_message` for `folder`: leading parts, then a final
/// `DocSync` (the only frame when the message fits in one).
pub fn frames(folder: &FolderId, sync_message: Vec<u8>) -> Vec<Message> {
    frames_of(folder, sync_message, MAX_DOC_SYNC_LEN)
}

fn frames_of(folder: &FolderId, sync_message: Vec<u8>, part_len: usize) -> Vec<Message> {
    if sync_message.len() <= part_len {
        return vec![Message::DocSync(DocSync {
            folder: folder.clone(),
            sync_message,
        })];
    }
    let pieces: Vec<&[u8]> = sync_message.chunks(part_len).collect();
    let last = pieces.len() - 1;
    pieces
        .into_iter()
        .enumerate()
        .map(|(index, piece)| {
            let sync = DocSync {
                folder: folder.clone(),
                sync_message: piece.to_vec(),
            };
            if index == last {
                Message::DocSync(sync)
            } else {
                Message::DocSyncPart(sync)
            }
        })
        .collect()
}

/// One peer's sync message for one folder, being reassembled.
#[derive(Debug, Default)]
pub struct SyncAssembly {
    pending: Vec<u8>,
}

impl SyncAssembly {
    /// Appends a leading part. Over [`MAX_DOC_SYNC_TOTAL_LEN`] in all, the partial
    /// message is dropped and the error says so.
    pub fn push_part(&mut self, part: &[u8]) -> Result<(), WireError> {
        self.check(part.len())?;
        self.pending.extend_from_slice(part);
        Ok(())
    }

    /// Completes the message with its final piece and returns it whole (just `last`
    /// when no parts came before). The assembly is empty again afterwards.
    pub fn finish(&mut self, last: Vec<u8>) -> Result<Vec<u8>, WireError> {
        if self.pending.is_empty() {
            return Ok(last);
        }
        self.check(last.len())?;
        let mut whole = std::mem::take(&mut self.pending);
        whole.extend_from_slice(&last);
        Ok(whole)
    }

    /// Bytes held from leading parts.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn check(&mut self, more: usize) -> Result<(), WireError> {
        let len = self.pending.len().saturating_add(more);
        if len > MAX_DOC_SYNC_TOTAL_LEN {
            self.pending = Vec::new();
            return Err(WireError::Limit {
                field: "reassembled sync_message",
                len,
                limit: MAX_DOC_SYNC_TOTAL_LEN,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn folder() -> FolderId {
        "docs".parse().unwrap()
    }

    fn reassemble(frames: Vec<Message>) -> Vec<u8> {
        let mut assembly = SyncAssembly::default();
        let mut whole = None;
        let count = frames.len();
        for (index, frame) in frames.into_iter().enumerate() {
            match frame {
                Message::DocSyncPart(part) => {
                    assert!(index + 1 < count, "a part was the last frame");
                    assert!(whole.is_none());
                    assembly.push_part(&part.sync_message).unwrap();
                }
                Message::DocSync(sync) => {
                    assert_eq!(index + 1, count, "the final frame was not last");
                    whole = Some(assembly.finish(sync.sync_message).unwrap());
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert_eq!(assembly.pending_len(), 0);
        whole.expect("no final frame")
    }

    #[test]
    fn a_message_that_fits_is_one_doc_sync() {
        let frames = frames(&folder(), vec![7; 1000]);
        assert_eq!(frames.len(), 1);
        assert!(matches!(&frames[0], Message::DocSync(s) if s.sync_message == vec![7; 1000]));
        assert_eq!(super::frames(&folder(), Vec::new()).len(), 1);
    }

    #[test]
    fn every_frame_of_a_large_message_encodes() {
        // Just over one frame's worth: two frames, both within the wire's limits.
        let message = vec![3u8; MAX_DOC_SYNC_LEN + 1];
        let frames = frames(&folder(), message.clone());
        assert_eq!(frames.len(), 2);
        for frame in &frames {
            crate::wire::encode(frame).unwrap();
        }
        assert_eq!(reassemble(frames), message);
    }

    #[test]
    fn more_than_the_total_limit_drops_the_partial_message() {
        let mut assembly = SyncAssembly::default();
        let part = vec![0u8; MAX_DOC_SYNC_LEN];
        for _ in 0..MAX_DOC_SYNC_TOTAL_LEN / MAX_DOC_SYNC_LEN {
            assembly.push_part(&part).unwrap();
        }
        assert!(matches!(
            assembly.push_part(&[1]),
            Err(WireError::Limit { .. })
        ));
        assert_eq!(assembly.pending_len(), 0);
        // The next message starts afresh.
        assert_eq!(assembly.finish(vec![9]).unwrap(), vec![9]);
        // A final piece that would go over the limit is refused too.
        for _ in 0..MAX_DOC_SYNC_TOTAL_LEN / MAX_DOC_SYNC_LEN {
            assembly.push_part(&part).unwrap();
        }
        assert!(assembly.finish(vec![1]).is_err());
        assert_eq!(assembly.pending_len(), 0);
    }

    proptest! {
        #[test]
        fn split_then_reassembled_is_the_same_message(
            message in proptest::collection::vec(any::<u8>(), 0..5000),
            part_len in 1usize..700,
        ) {
            let frames = frames_of(&folder(), message.clone(), part_len);
            prop_assert_eq!(frames.len(), message.len().div_ceil(part_len).max(1));
            for frame in &frames {
                let len = match frame {
                    Message::DocSync(s) | Message::DocSyncPart(s) => s.sync_message.len(),
                    _ => usize::MAX,
                };
                prop_assert!(len <= part_len);
            }
            prop_assert_eq!(reassemble(frames), message);
        }
    }
}
