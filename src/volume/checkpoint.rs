//! The checkpoint slots and the write generations they make durable.
//!
//! Every sealed block (data, tree page, log summary) takes a fresh
//! generation, which is its XTS tweak. Generations are reserved in large
//! steps: before any generation at or past the durable limit is used, a
//! higher limit is written to a checkpoint slot, so that after a crash no
//! generation is ever used twice, even by writes that never became durable.

use std::sync::{Arc, Condvar, Mutex};

use super::ctx::Ctx;
use super::format::{Block, Checkpoint, DecodeError, Header, CHECKPOINT_BLOCKS, CHECKPOINT_MAC_AT};
use super::Generation;
use crate::crypto::{BlockKind, Mac, Tag, VolumeKeys};
use crate::device::read_exact_at;
use crate::volume::{Result, VolumeError};
use crate::BLOCK_SIZE;

/// Generations reserved durably at a time.
const GEN_RESERVE: u64 = 1 << 32;

/// The newest durable checkpoint and the generation counter.
pub struct Checkpoints {
    pub last: Checkpoint,
    pub next_gen: Generation,
    /// Every generation below it may have been used; it is durable in the
    /// latest checkpoint slot before any generation near it is handed out.
    pub gen_limit: Generation,
    /// A checkpoint whose pages are in the log and whose slot is sealed,
    /// waiting to be made durable (see [`Landing`]). `last` stays the
    /// newest durable one until it lands.
    in_flight: Option<(Checkpoint, Arc<Landing>)>,
}

/// The durable half of a checkpoint: flush the log (its tree pages), write
/// its sealed slot, flush again. It needs no lock on the volume's state,
/// so a background thread can do it while operations go on; any thread
/// that needs it done (the next checkpoint, a close) does it itself, or
/// waits for the thread already doing it.
pub struct Landing {
    slot: Box<Block>,
    at: u64,
    stage: Mutex<Stage>,
    landed: Condvar,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Writing,
    /// Durable, or failed (the volume is then poisoned).
    Done(bool),
}

impl Landing {
    /// Makes the checkpoint durable, unless another thread did or is doing
    /// it (then waits for that one). Returns whether this thread wrote it.
    /// A failed write poisons the volume.
    pub fn land(&self, ctx: &Ctx) -> Result<bool> {
        let mut stage = self.stage.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *stage {
                Stage::Done(true) => return Ok(false),
                Stage::Done(false) => return Err(VolumeError::PreviousIo),
                Stage::Writing => {
                    stage = self.landed.wait(stage).unwrap_or_else(|p| p.into_inner());
                }
                Stage::Waiting => {
                    *stage = Stage::Writing;
                    drop(stage);
                    let r = self.write(ctx);
                    stage = self.stage.lock().unwrap_or_else(|p| p.into_inner());
                    *stage = Stage::Done(r.is_ok());
                    self.landed.notify_all();
                    return r.map(|()| true);
                }
            }
        }
    }

    /// Landed, or failed to.
    pub fn done(&self) -> bool {
        matches!(
            *self.stage.lock().unwrap_or_else(|p| p.into_inner()),
            Stage::Done(_)
        )
    }

    fn write(&self, ctx: &Ctx) -> Result<()> {
        ctx.dev.flush().map_err(|e| {
            ctx.poison();
            VolumeError::io("flushing before a checkpoint", e)
        })?;
        write_sealed(ctx, &self.slot, self.at)
    }
}

impl Checkpoints {
    /// Starts from the newest valid checkpoint on the device.
    pub fn read(ctx: &Ctx) -> Result<Checkpoints> {
        let c = read_newest(ctx)?;
        Ok(Checkpoints {
            next_gen: c.gen_limit,
            gen_limit: c.gen_limit,
            last: c,
            in_flight: None,
        })
    }

    /// Hands out `n` fresh generations, first making a higher limit
    /// durable if they would reach the current one.
    pub fn alloc_gens(&mut self, ctx: &Ctx, n: u64) -> Result<Generation> {
        if self.next_gen.0 > u64::MAX / 2 {
            // 2^63 block writes: unreachable in practice, checked so that a
            // (MAC-valid) checkpoint can never make the counter wrap.
            return Err(VolumeError::Corrupted(
                "the write generation counter is exhausted".into(),
            ));
        }
        if self.next_gen + n > self.gen_limit {
            // Its slot follows the one in flight, which lands first.
            self.settle(ctx)?;
            let mut c = self.last.clone();
            c.seq += 1;
            c.gen_limit = self.next_gen + n + GEN_RESERVE;
            c.key_gen = ctx.keys.current().key_gen() as u32;
            write_slot(ctx, &c)?;
            self.gen_limit = c.gen_limit;
            self.last = c;
        }
        let base = self.next_gen;
        self.next_gen += n;
        Ok(base)
    }

    /// Seals `c` (whose sequence number follows the last one) under the
    /// current key generation and puts it in flight: it becomes `last`
    /// when it has landed (see [`Checkpoints::settle`]). The log must hold
    /// everything `c` points at; the landing flushes it first.
    pub fn begin(&mut self, ctx: &Ctx, mut c: Checkpoint) -> Result<Arc<Landing>> {
        debug_assert!(self.in_flight.is_none() && c.seq == self.last.seq + 1);
        c.key_gen = ctx.keys.current().key_gen() as u32;
        let landing = Arc::new(Landing {
            slot: seal(ctx.keys, ctx.header, &c)?,
            at: slot_offset(c.seq),
            stage: Mutex::new(Stage::Waiting),
            landed: Condvar::new(),
        });
        self.in_flight = Some((c, landing.clone()));
        Ok(landing)
    }

    /// Lands the checkpoint in flight, if any (see [`Landing::land`]), and
    /// makes it `last`. Returns whether one landed.
    pub fn settle(&mut self, ctx: &Ctx) -> Result<bool> {
        let Some((c, landing)) = self.in_flight.take() else {
            return Ok(false);
        };
        landing.land(ctx)?;
        self.last = c;
        Ok(true)
    }

    /// The checkpoint in flight, if any.
    pub fn in_flight(&self) -> Option<&Arc<Landing>> {
        self.in_flight.as_ref().map(|(_, l)| l)
    }
}

/// Seals `c` and writes it to its slot (sequence number parity), durably.
/// A failed write poisons the volume.
fn write_slot(ctx: &Ctx, c: &Checkpoint) -> Result<()> {
    let b = seal(ctx.keys, ctx.header, c)?;
    write_sealed(ctx, &b, slot_offset(c.seq))
}

/// Writes a sealed checkpoint block at `at`, durably. A failed write
/// poisons the volume.
fn write_sealed(ctx: &Ctx, b: &Block, at: u64) -> Result<()> {
    let r = ctx.dev.write_at(&b[..], at).and_then(|_| ctx.dev.flush());
    r.map_err(|e| {
        ctx.poison();
        VolumeError::io("writing a checkpoint", e)
    })
}

/// Where checkpoint `seq` goes: the slot of its parity.
fn slot_offset(seq: u64) -> u64 {
    CHECKPOINT_BLOCKS[(seq % 2) as usize] * BLOCK_SIZE as u64
}

/// `c` encoded and MAC'd for its slot, under the key generation it names
/// as current.
pub fn seal(keys: &VolumeKeys, header: &Header, c: &Checkpoint) -> Result<Box<Block>> {
    let slot = c.seq % 2;
    let mut b = c.encode_body(header);
    let key_gen = c.key_gen as u16;
    let gk = keys.get(key_gen).ok_or_else(|| {
        VolumeError::Corrupted(format!(
            "a checkpoint names key generation {key_gen}, which the key ring does not hold"
        ))
    })?;
    let mac = gk.mac(
        Tag::new(BlockKind::Checkpoint, slot, c.seq, key_gen),
        &b[..CHECKPOINT_MAC_AT],
    );
    b[CHECKPOINT_MAC_AT..].copy_from_slice(&mac.0);
    Ok(b)
}

/// Reads both checkpoint slots and returns the newest that authenticates.
pub fn read_newest(ctx: &Ctx) -> Result<Checkpoint> {
    let mut best: Option<Checkpoint> = None;
    let mut why = Vec::new();
    for (slot, blk) in CHECKPOINT_BLOCKS.iter().enumerate() {
        let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
        if let Err(e) = read_exact_at(ctx.dev, &mut b[..], blk * BLOCK_SIZE as u64) {
            why.push(format!("slot {slot}: {e}"));
            continue;
        }
        let seq = u64::from_le_bytes(b[32..40].try_into().expect("8 bytes"));
        // The key generation is read before the MAC that covers it is
        // checked: it only picks the key the MAC is checked with.
        let key_gen = Checkpoint::peek_key_gen(&b);
        let tag = Tag::new(BlockKind::Checkpoint, slot as u64, seq, key_gen);
        let mac = Mac(b[CHECKPOINT_MAC_AT..].try_into().expect("16 bytes"));
        if ctx.keys.get(key_gen).is_none() {
            why.push(format!(
                "slot {slot}: sealed under key generation {key_gen}, which the volume's header \
                 does not hold"
            ));
            continue;
        }
        if !ctx.keys.verify(tag, &b[..CHECKPOINT_MAC_AT], &mac) {
            why.push(format!("slot {slot}: {}", DecodeError::Mac));
            continue;
        }
        match Checkpoint::decode(&b, ctx.header) {
            Ok(c) if c.seq % 2 == slot as u64 => {
                if best.as_ref().is_none_or(|b| c.seq > b.seq) {
                    best = Some(c);
                }
            }
            Ok(c) => why.push(format!(
                "slot {slot}: sequence {} belongs in the other slot",
                c.seq
            )),
            Err(e) => why.push(format!("slot {slot}: {e}")),
        }
    }
    best.ok_or_else(|| VolumeError::Corrupted(format!("no valid checkpoint ({})", why.join("; "))))
}
