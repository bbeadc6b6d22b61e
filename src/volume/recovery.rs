//! Opening a volume: choosing the newest valid checkpoint, loading segment
//! usage, and rolling the log forward past the checkpoint.
//!
//! Roll-forward follows the record chain from the checkpoint's log head.
//! A record counts only if its summary authenticates, it carries the
//! expected sequence number and the MAC of its predecessor, and every one of
//! its payload blocks authenticates. Records are applied a transaction at a
//! time, when the COMMIT record arrives; a transaction whose tail is missing
//! (a crash mid-write) is dropped whole, and the log head goes back to where
//! it started. A writable open then erases the dropped transaction's first
//! summary, so the chain can only continue through records written later.

use super::checkpoint::Checkpoints;
use super::ctx::Ctx;
use super::geometry::Geometry;
use super::log::Record;
use super::snapshot::Snapshots;
use super::state::State;
use crate::volume::{Result, SegmentId, VolumeError};
use crate::BLOCK_SIZE;

/// What roll-forward found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records replayed (committed transactions only).
    pub records: u64,
    /// Transactions replayed.
    pub transactions: u64,
    /// Records of an incomplete trailing transaction that were dropped.
    pub dropped_records: u64,
    /// Segments the log wrote after the checkpoint (committed or not).
    pub touched: std::collections::BTreeSet<SegmentId>,
    /// Block address of the first dropped record's summary, if any.
    pub dropped_at: Option<u64>,
}

/// Opens the state: the newest checkpoint, its snapshot metadata and
/// segment usage, then the log rolled forward past it. A writable open then
/// makes the recovered state the new checkpoint, so the replayed log can be
/// reused.
pub fn recover(
    ctx: &Ctx,
    cache_pages: usize,
    read_only: bool,
    newest_seen: Option<u64>,
) -> Result<(State, Recovery)> {
    let ckpts = Checkpoints::read(ctx)?;
    if let Some(seen) = newest_seen.filter(|s| ckpts.last.seq < *s) {
        return Err(VolumeError::Rollback {
            have: ckpts.last.seq,
            seen,
        });
    }
    let mut st = State::at_checkpoint(Geometry::of(ctx.header), ckpts, cache_pages);
    let c = st.ckpt.last.clone();
    let (meta, pages) = Snapshots::read_meta(ctx, c.snap_meta, c.snap_pages, st.ckpt.gen_limit)?;
    st.snaps
        .install(meta, pages, (c.snap_meta, c.snap_pages), &mut st.usage.held);
    st.usage.load(ctx, &mut st.trees, st.log.extent)?;
    let empty: Vec<SegmentId> = st
        .log
        .segments()
        .filter(|s| st.usage.live(*s) == 0)
        .collect();
    let r = st.roll_forward(ctx)?;
    st.log.free_after_recovery(&empty, &r.touched);
    if !read_only {
        erase_dropped(ctx, &r)?;
        st.refresh_reserve(ctx, &[]);
        st.queue_stale_discards(ctx);
        // Reserve generations durably, then checkpoint. If there is no room
        // for it, the volume still opens: the log stays where it is and is
        // replayed again next time, and reads and trims can make room.
        st.alloc_gens(ctx, 0)?;
        st.alloc_gens(ctx, 1)?;
        match st.checkpoint(ctx) {
            Ok(()) => {}
            Err(e) if e.is_no_space() => {}
            Err(e) => return Err(e),
        }
    }
    Ok((st, r))
}

impl State {
    /// Replays every committed transaction after the checkpoint.
    pub fn roll_forward(&mut self, ctx: &Ctx) -> Result<Recovery> {
        let mut stats = Recovery::default();
        let mut pos = self.log.head;
        let mut pending: Vec<(Record, u64)> = Vec::new();
        loop {
            let here = if (pos.offset as u64) < self.geo.seg_blocks {
                self.log
                    .chained_record(ctx, &pos, pos.segment, pos.offset as u64)?
            } else {
                None
            };
            let rec = match here {
                Some(r) => r,
                None => match self.log.chained_record(ctx, &pos, pos.next_segment, 0)? {
                    Some(r) => {
                        pos.segment = pos.next_segment;
                        pos.offset = 0;
                        r
                    }
                    None => break,
                },
            };
            let at = self.geo.pba_of(pos.segment, pos.offset as u64);
            pos.next_segment = rec.head.next_segment;
            pos.offset += 1 + rec.head.n_payload as u32;
            pos.seq += 1;
            pos.anchor = rec.mac;
            self.log.extent = self
                .log
                .extent
                .max(pos.segment.0 + 1)
                .max(pos.next_segment.0 + 1);
            stats.touched.insert(pos.segment);
            let commit = rec.head.commit();
            pending.push((rec, at));
            if commit {
                for (r, at) in pending.drain(..) {
                    let pbas: Vec<u64> = (0..r.head.n_payload as u64).map(|i| at + 1 + i).collect();
                    self.apply(ctx, &r.entries, &pbas)?;
                    self.log.blocks_since_checkpoint += 1 + r.head.n_payload as u64;
                    stats.records += 1;
                }
                stats.transactions += 1;
                self.log.head = pos;
            }
        }
        stats.dropped_records = pending.len() as u64;
        stats.dropped_at = pending.first().map(|(_, at)| *at);
        Ok(stats)
    }
}

/// Erases the first record of a dropped transaction. It carries the
/// sequence number and chain MAC that the next record will carry; if the
/// next record were written elsewhere (the next segment), a later
/// recovery would follow this stale one and lose what came after.
fn erase_dropped(ctx: &Ctx, r: &Recovery) -> Result<()> {
    if let Some(at) = r.dropped_at {
        ctx.dev
            .write_at(&[0u8; BLOCK_SIZE], at * BLOCK_SIZE as u64)
            .and_then(|_| ctx.dev.flush())
            .map_err(|e| {
                VolumeError::io(format!("erasing the dropped log record at block {at}"), e)
            })?;
    }
    Ok(())
}
