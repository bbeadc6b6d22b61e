//! A volume's geometry: the sizes fixed at creation, the shapes of its
//! metadata trees, and the space bound (how many segments a volume of a
//! given logical size may use, and the reserve kept back for checkpoints
//! and the cleaner; docs/FORMAT.md, "Space bound").

use super::format::{Header, DATA_START, ENTRIES_PER_RECORD, MAP_ENTRIES_PER_PAGE};
use super::tree::{self, Shape};
use super::SegmentId;
use crate::BLOCK_SIZE;

/// Bits per bitmap leaf page.
pub const BITS_PER_PAGE: u64 = (BLOCK_SIZE * 8) as u64;
/// Segment-usage counters (u32) per leaf page.
pub const USAGE_PER_PAGE: u64 = (BLOCK_SIZE / 4) as u64;

/// The trees' shapes for a volume geometry: map, three bitmaps, usage.
pub fn shapes(logical_blocks: u64, max_segments: u64) -> [Shape; 5] {
    let bitmap = Shape::new(logical_blocks.div_ceil(BITS_PER_PAGE));
    [
        Shape::new(logical_blocks.div_ceil(MAP_ENTRIES_PER_PAGE as u64)),
        bitmap,
        bitmap,
        bitmap,
        Shape::new(max_segments.div_ceil(USAGE_PER_PAGE)),
    ]
}

/// What an open volume's parts need to know of its sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub seg_blocks: u64,
    pub max_segments: u64,
    pub logical_blocks: u64,
    /// Segments kept back from ordinary writes for checkpoints and the cleaner.
    pub reserve: u64,
    /// Dirty metadata pages that force a checkpoint.
    pub dirty_limit: u64,
}

impl Geometry {
    pub fn of(header: &Header) -> Geometry {
        let seg_blocks = header.segment_blocks as u64;
        let (dirty_limit, _, reserve) = reserves(header.logical_blocks, seg_blocks);
        Geometry {
            seg_blocks,
            max_segments: header.max_segments,
            logical_blocks: header.logical_blocks,
            reserve,
            dirty_limit,
        }
    }

    /// The block address of `offset` in segment `seg`.
    pub fn pba_of(&self, seg: SegmentId, offset: u64) -> u64 {
        DATA_START + seg.0 * self.seg_blocks + offset
    }

    pub fn segment_of(&self, pba: u64) -> SegmentId {
        SegmentId((pba - DATA_START) / self.seg_blocks)
    }

    pub fn shapes(&self) -> [Shape; 5] {
        shapes(self.logical_blocks, self.max_segments)
    }
}

/// Largest number of dirty metadata pages before a checkpoint is forced.
pub(super) const MAX_DIRTY_PAGES: u64 = 2048;

pub(super) fn usable_per_segment(seg_blocks: u64) -> u64 {
    seg_blocks - seg_blocks.div_ceil(ENTRIES_PER_RECORD as u64 + 1)
}

/// Metadata pages a fully written volume has (leaves plus interior pages).
pub(super) fn metadata_pages(logical_blocks: u64) -> u64 {
    let sh = shapes(logical_blocks, 0);
    let leaves = sh[0].leaves + 3 * sh[1].leaves;
    leaves + leaves / (tree::FANOUT - 1) + 16
}

/// Dirty-page limit, checkpoint reserve, and total reserve, in that order.
pub(super) fn reserves(logical_blocks: u64, seg_blocks: u64) -> (u64, u64, u64) {
    let dirty_limit = MAX_DIRTY_PAGES.min(metadata_pages(logical_blocks));
    let usable = usable_per_segment(seg_blocks);
    // A checkpoint writes the dirty pages plus what one cleaned victim can
    // dirty on top of them, and the usage pages.
    let ckpt = ((dirty_limit + seg_blocks) * 11 / 10).div_ceil(usable) + 1;
    (dirty_limit, ckpt, ckpt + 2)
}

/// Blocks the data and two copies of the metadata take when the volume is
/// full: what the space bound is sized for, before headroom.
pub(super) fn data_need(logical_blocks: u64) -> u64 {
    logical_blocks + 2 * metadata_pages(logical_blocks)
}

/// Refuses a segment size the format does not allow (a power of two
/// from MIN_SEGMENT_BLOCKS to MAX_SEGMENT_BLOCKS).
pub fn check_segment_blocks(seg: u32) -> super::Result<()> {
    use super::format::{MAX_SEGMENT_BLOCKS, MIN_SEGMENT_BLOCKS};
    if seg.is_power_of_two() && (MIN_SEGMENT_BLOCKS..=MAX_SEGMENT_BLOCKS).contains(&seg) {
        return Ok(());
    }
    Err(super::VolumeError::InvalidArgument(format!(
        "segment size must be a power of two between {MIN_SEGMENT_BLOCKS} and \
         {MAX_SEGMENT_BLOCKS} blocks, not {seg}"
    )))
}

/// The largest logical size, in blocks, whose space bound fits in
/// `device_blocks` (a block device's size), with `seg_blocks` per
/// segment; None if not even one block fits, or the segment size is
/// not one the format allows.
pub fn largest_fitting(device_blocks: u64, seg_blocks: u32) -> Option<u64> {
    check_segment_blocks(seg_blocks).ok()?;
    let fits =
        |l: u64| DATA_START + max_segments_for(l, seg_blocks) * seg_blocks as u64 <= device_blocks;
    if !fits(1) {
        return None;
    }
    // The bound grows with the size: the last size that fits, by halving.
    let (mut lo, mut hi) = (1, super::format::MAX_LOGICAL_BLOCKS);
    if fits(hi) {
        return Some(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The most segments a volume of this logical size may use. The backing
/// file never grows past `DATA_START + max_segments * segment_blocks`
/// blocks: the live data and metadata, 25% more for the cleaner to work
/// with, and the reserve. See docs/FORMAT.md, "Space bound".
pub fn max_segments_for(logical_blocks: u64, seg_blocks: u32) -> u64 {
    let seg = seg_blocks as u64;
    let need = data_need(logical_blocks);
    let with_headroom = need + need / 4;
    with_headroom.div_ceil(usable_per_segment(seg)) + reserves(logical_blocks, seg).2 + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_fitting_size_fits_and_one_block_more_does_not() {
        let end = |l: u64, seg: u32| DATA_START + max_segments_for(l, seg) * seg as u64;
        for (device, seg) in [(262_144, 1024), (1 << 28, 1024), (300_000, 16), (2_000, 16)] {
            let l = largest_fitting(device, seg).unwrap();
            assert!(end(l, seg) <= device, "{device} {seg}: {l}");
            assert!(
                end(l + 1, seg) > device,
                "{device} {seg}: {l} is not the largest"
            );
        }
        assert_eq!(largest_fitting(DATA_START, 1024), None);
        // A segment size the format refuses fits nothing.
        assert_eq!(largest_fitting(1 << 28, 0), None);
        assert_eq!(largest_fitting(1 << 28, 1000), None);
    }
}
