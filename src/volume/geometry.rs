//! The space bound: how many segments a volume of a given logical size may
//! use, and the reserve kept back for checkpoints and the cleaner. See
//! docs/FORMAT.md, "Space bound".

use super::format::ENTRIES_PER_RECORD;
use super::state;
use super::tree;

/// Largest number of dirty metadata pages before a checkpoint is forced.
pub(super) const MAX_DIRTY_PAGES: u64 = 2048;

pub(super) fn usable_per_segment(seg_blocks: u64) -> u64 {
    seg_blocks - seg_blocks.div_ceil(ENTRIES_PER_RECORD as u64 + 1)
}

/// Metadata pages a fully written volume has (leaves plus interior pages).
pub(super) fn metadata_pages(logical_blocks: u64) -> u64 {
    let sh = state::shapes(logical_blocks, 0);
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
