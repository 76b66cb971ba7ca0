//! Manifests: what a file's content is, as an ordered list of blocks.
//!
//! A manifest is the file size plus the ordered `(hash, length)` of its blocks; the
//! blocks laid end to end are the file. Its own name is [`Manifest::hash`], a BLAKE3
//! hash of its canonical encoding under a manifest-only key derivation context.
//!
//! Invariants (checked by every constructor, including decoding from outside):
//! - every block length is in `1..=MAX_BLOCK_LEN`;
//! - the lengths add up to `size`;
//! - there are at most [`MAX_MANIFEST_BLOCKS`] blocks.
//!
//! An empty file has the empty manifest (size 0, no blocks).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::hash::{BlockHash, ManifestHash};

/// Largest block Weft ever cuts or accepts: fastcdc's own ceiling for `max`.
/// Bounds every block buffer and frame that carries a block.
pub const MAX_BLOCK_LEN: u32 = 16 * 1024 * 1024;

/// Most blocks in one manifest. At 36 bytes per block the encoding stays under
/// 28 MiB (it must fit one frame, see `wire::MAX_FRAME_LEN`). With the default chunk
/// parameters (min 64 KiB, average 256 KiB) that is files of at least 48 GiB, and about
/// 192 GiB typically; larger files are refused by the scanner with a clear error
/// until manifests are split into segments (see `docs/protocol.md`).
pub const MAX_MANIFEST_BLOCKS: usize = 786_432;

/// `derive_key` context for manifest hashes; a new encoding gets a new context.
const MANIFEST_HASH_CONTEXT: &str = "weft 2026-11 manifest v1";

/// One block of a file: its hash and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockRef {
    /// BLAKE3 of the block's bytes.
    pub hash: BlockHash,
    /// Length in bytes, `1..=MAX_BLOCK_LEN`.
    pub len: u32,
}

/// Why a manifest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// A block of length 0 or over [`MAX_BLOCK_LEN`].
    #[error("block {index} has length {len}, outside 1..={MAX_BLOCK_LEN}")]
    BlockLength {
        /// Index of the block.
        index: usize,
        /// Its claimed length.
        len: u32,
    },
    /// The block lengths do not add up to the size.
    #[error("manifest says {size} bytes but its blocks add up to {sum}")]
    SizeMismatch {
        /// Claimed size.
        size: u64,
        /// Sum of block lengths.
        sum: u64,
    },
    /// More blocks than [`MAX_MANIFEST_BLOCKS`].
    #[error("file too large for one manifest: {blocks} blocks, the limit is {MAX_MANIFEST_BLOCKS}")]
    TooManyBlocks {
        /// Blocks found.
        blocks: usize,
    },
    /// The bytes are not a manifest encoding.
    #[error("malformed manifest encoding: {0}")]
    Encoding(String),
}

/// A file's content as an ordered list of blocks. See the module doc for invariants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawManifest", into = "RawManifest")]
pub struct Manifest {
    size: u64,
    blocks: Vec<BlockRef>,
}

#[derive(Serialize, Deserialize)]
struct RawManifest {
    size: u64,
    blocks: Vec<BlockRef>,
}

impl TryFrom<RawManifest> for Manifest {
    type Error = ManifestError;
    fn try_from(raw: RawManifest) -> Result<Self, ManifestError> {
        let manifest = Manifest::from_blocks(raw.blocks)?;
        if manifest.size != raw.size {
            return Err(ManifestError::SizeMismatch {
                size: raw.size,
                sum: manifest.size,
            });
        }
        Ok(manifest)
    }
}

impl From<Manifest> for RawManifest {
    fn from(manifest: Manifest) -> Self {
        RawManifest {
            size: manifest.size,
            blocks: manifest.blocks,
        }
    }
}

impl Manifest {
    /// The manifest of an empty file.
    pub fn empty() -> Self {
        Self {
            size: 0,
            blocks: Vec::new(),
        }
    }

    /// Builds a manifest from its blocks, checking the invariants.
    pub fn from_blocks(blocks: Vec<BlockRef>) -> Result<Self, ManifestError> {
        if blocks.len() > MAX_MANIFEST_BLOCKS {
            return Err(ManifestError::TooManyBlocks {
                blocks: blocks.len(),
            });
        }
        let mut size = 0u64;
        for (index, block) in blocks.iter().enumerate() {
            if block.len == 0 || block.len > MAX_BLOCK_LEN {
                return Err(ManifestError::BlockLength {
                    index,
                    len: block.len,
                });
            }
            size += u64::from(block.len);
        }
        Ok(Self { size, blocks })
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blocks in file order.
    pub fn blocks(&self) -> &[BlockRef] {
        &self.blocks
    }

    /// Each block with its byte offset in the file.
    pub fn blocks_with_offsets(&self) -> impl Iterator<Item = (u64, &BlockRef)> {
        self.blocks.iter().scan(0u64, |offset, block| {
            let start = *offset;
            *offset += u64::from(block.len);
            Some((start, block))
        })
    }

    /// Canonical encoding (postcard of size and blocks); what [`Manifest::hash`] covers.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes and validates a manifest received from outside.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let (manifest, rest) = postcard::take_from_bytes::<Manifest>(bytes).map_err(|error| {
            // Invariant violations surface as serde custom errors; keep their text.
            ManifestError::Encoding(error.to_string())
        })?;
        if !rest.is_empty() {
            return Err(ManifestError::Encoding(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        Ok(manifest)
    }

    /// The manifest's name.
    pub fn hash(&self) -> ManifestHash {
        let mut hasher = blake3::Hasher::new_derive_key(MANIFEST_HASH_CONTEXT);
        hasher.update(&self.encode());
        ManifestHash(*hasher.finalize().as_bytes())
    }
}

/// How a byte stream differs from a manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Reading failed.
    #[error("reading failed: {0}")]
    Io(#[from] io::Error),
    /// A block's bytes do not hash to the manifest's hash.
    #[error("block {index} at offset {offset} does not match its hash")]
    BlockMismatch {
        /// Index of the first bad block.
        index: usize,
        /// Its offset.
        offset: u64,
    },
    /// The stream ended before the manifest's size.
    #[error("content is shorter than the manifest's {expected} bytes (ended at {found})")]
    TooShort {
        /// Manifest size.
        expected: u64,
        /// Bytes read.
        found: u64,
    },
    /// The stream has bytes past the manifest's size.
    #[error("content is longer than the manifest's {expected} bytes")]
    TooLong {
        /// Manifest size.
        expected: u64,
    },
}

/// Checks that `reader` yields exactly the content `manifest` describes.
///
/// Memory is bounded by the largest block. Stops at the first mismatching block.
pub fn verify<R: Read>(mut reader: R, manifest: &Manifest) -> Result<(), VerifyError> {
    let largest = manifest.blocks.iter().map(|b| b.len).max().unwrap_or(0);
    let mut buffer = vec![0u8; largest as usize];
    for (index, (offset, block)) in manifest.blocks_with_offsets().enumerate() {
        let data = &mut buffer[..block.len as usize];
        let filled = read_full(&mut reader, data)?;
        if filled < data.len() {
            return Err(VerifyError::TooShort {
                expected: manifest.size,
                found: offset + filled as u64,
            });
        }
        if BlockHash::of(data) != block.hash {
            return Err(VerifyError::BlockMismatch { index, offset });
        }
    }
    let mut probe = [0u8; 1];
    if read_full(&mut reader, &mut probe)? != 0 {
        return Err(VerifyError::TooLong {
            expected: manifest.size,
        });
    }
    Ok(())
}

/// Reads until `buffer` is full or the stream ends; returns the bytes read.
pub(crate) fn read_full<R: Read>(reader: &mut R, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block(data: &[u8]) -> BlockRef {
        BlockRef {
            hash: BlockHash::of(data),
            len: data.len() as u32,
        }
    }

    #[test]
    fn verify_accepts_exact_content_and_names_the_bad_block() {
        let manifest = Manifest::from_blocks(vec![block(b"hello "), block(b"world")]).unwrap();
        assert_eq!(manifest.size(), 11);
        verify(&b"hello world"[..], &manifest).unwrap();
        assert!(matches!(
            verify(&b"hello worle"[..], &manifest),
            Err(VerifyError::BlockMismatch {
                index: 1,
                offset: 6
            })
        ));
        assert!(matches!(
            verify(&b"hello wor"[..], &manifest),
            Err(VerifyError::TooShort {
                expected: 11,
                found: 9
            })
        ));
        assert!(matches!(
            verify(&b"hello world!"[..], &manifest),
            Err(VerifyError::TooLong { expected: 11 })
        ));
        verify(&b""[..], &Manifest::empty()).unwrap();
    }

    #[test]
    fn decode_rejects_broken_invariants() {
        let good = Manifest::from_blocks(vec![block(b"abc")]).unwrap();
        let lying_size = postcard::to_allocvec(&RawManifest {
            size: 4,
            blocks: good.blocks().to_vec(),
        })
        .unwrap();
        assert!(Manifest::decode(&lying_size).is_err());
        let zero_block = postcard::to_allocvec(&RawManifest {
            size: 0,
            blocks: vec![BlockRef {
                hash: BlockHash([0; 32]),
                len: 0,
            }],
        })
        .unwrap();
        assert!(Manifest::decode(&zero_block).is_err());
        let mut trailing = good.encode();
        trailing.push(0);
        assert!(Manifest::decode(&trailing).is_err());
        assert_eq!(Manifest::decode(&good.encode()).unwrap(), good);
    }

    #[test]
    fn manifest_hash_depends_on_blocks_and_differs_from_block_hash() {
        let a = Manifest::from_blocks(vec![block(b"a"), block(b"b")]).unwrap();
        let b = Manifest::from_blocks(vec![block(b"b"), block(b"a")]).unwrap();
        assert_ne!(a.hash(), b.hash());
        assert_ne!(a.hash().0, BlockHash::of(&a.encode()).0);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
        }
    }
}
