//! Byte layouts of the records stored in the database (docs/PROTOCOL.md,
//! "Database records"). Every record starts with a format byte; decoding
//! checks lengths and never panics.
//!
//! Host record (table `hosts`, key = host id):
//!
//! | offset | len | field                                  |
//! |--------|-----|----------------------------------------|
//! | 0      | 1   | format = 1                             |
//! | 1      | 8   | enrolled, Unix ms, u64 BE              |
//! | 9      | 8   | revoked, Unix ms, u64 BE (0 = active)  |
//! | 17     | 1   | name length n (1..=64)                 |
//! | 18     | n   | name, UTF-8                            |
//!
//! Volume record (table `volumes`, key = volume id):
//!
//! | offset | len | field                                  |
//! |--------|-----|----------------------------------------|
//! | 0      | 1   | format = 1                             |
//! | 1      | 8   | created, Unix ms, u64 BE               |
//! | 9      | 4   | newest KEK version, u32 BE             |
//!
//! Challenge record (table `challenges`, key = challenge):
//!
//! | offset | len | field                                  |
//! |--------|-----|----------------------------------------|
//! | 0      | 32  | host id it was issued to               |
//! | 32     | 8   | expires, Unix ms, u64 BE               |
//! | 40     | 1   | used (0 or 1)                          |
//!
//! Audit record (table `audit`, key = sequence number u64):
//!
//! | offset | len | field                                        |
//! |--------|-----|----------------------------------------------|
//! | 0      | 1   | format = 1                                   |
//! | 1      | 8   | time, Unix ms, u64 BE                        |
//! | 9      | 1   | flags: bit 0 host present, bit 1 volume      |
//! | 10     | 32  | host id (zero when absent)                   |
//! | 42     | 16  | volume id (zero when absent)                 |
//! | 58     | 4   | KEK version, u32 BE (0 = none)               |
//! | 62     | 1   | outcome: 0 ok, 1 refused                     |
//! | 63     | 1   | action length a (1..=32)                     |
//! | 64     | a   | action, ASCII                                |
//! | 64+a   | 2   | reason length r, u16 BE (≤ 1024)             |
//! | 66+a   | r   | reason, UTF-8                                |
//!
//! Sealed KEK (table `keks`, key = (volume id, version)): see `at_rest`.

use crate::protocol::{HostId, KekVersion, VolumeId};

use super::StorageError;

/// Format byte of every versioned record.
pub const RECORD_FORMAT: u8 = 1;

/// Longest host name.
pub const MAX_NAME: usize = 64;
/// Longest audit reason kept; longer ones are truncated.
pub const MAX_REASON: usize = 1024;

const HOST_ENROLLED: usize = 1;
const HOST_REVOKED: usize = HOST_ENROLLED + 8;
const HOST_NAME_LEN: usize = HOST_REVOKED + 8;
const HOST_NAME: usize = HOST_NAME_LEN + 1;

const VOL_CREATED: usize = 1;
const VOL_NEWEST: usize = VOL_CREATED + 8;
const VOL_LEN: usize = VOL_NEWEST + 4;

const CH_EXPIRES: usize = 32;
const CH_USED: usize = CH_EXPIRES + 8;
const CH_LEN: usize = CH_USED + 1;

const AU_TIME: usize = 1;
const AU_FLAGS: usize = AU_TIME + 8;
const AU_HOST: usize = AU_FLAGS + 1;
const AU_VOLUME: usize = AU_HOST + 32;
const AU_VERSION: usize = AU_VOLUME + 16;
const AU_OUTCOME: usize = AU_VERSION + 4;
const AU_ACTION_LEN: usize = AU_OUTCOME + 1;
const AU_ACTION: usize = AU_ACTION_LEN + 1;

fn corrupted(what: &str) -> StorageError {
    StorageError::Corrupted(what.to_string())
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn check_format(b: &[u8], what: &str) -> Result<(), StorageError> {
    match b.first() {
        Some(&RECORD_FORMAT) => Ok(()),
        Some(&other) => Err(StorageError::Corrupted(format!(
            "{what} record: format want={RECORD_FORMAT} have={other}"
        ))),
        None => Err(corrupted(what)),
    }
}

/// True if `name` may name a host: 1..=64 of `[A-Za-z0-9._-]`, not all hex
/// of host-id length (so a name never reads as a host id).
pub fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        && HostId::from_hex(name).is_err()
}

/// An enrolled host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    /// Administrator-chosen name.
    pub name: String,
    /// Enrollment time, Unix ms.
    pub enrolled_ms: u64,
    /// Revocation time, Unix ms; `None` while active.
    pub revoked_ms: Option<u64>,
}

impl HostRecord {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut b = Vec::with_capacity(HOST_NAME + name.len());
        b.push(RECORD_FORMAT);
        b.extend_from_slice(&self.enrolled_ms.to_be_bytes());
        b.extend_from_slice(&self.revoked_ms.unwrap_or(0).to_be_bytes());
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        b
    }

    /// Decodes and validates a record.
    pub fn decode(b: &[u8]) -> Result<HostRecord, StorageError> {
        check_format(b, "host")?;
        let enrolled_ms = u64_at(b, HOST_ENROLLED).ok_or_else(|| corrupted("host"))?;
        let revoked = u64_at(b, HOST_REVOKED).ok_or_else(|| corrupted("host"))?;
        let n = usize::from(*b.get(HOST_NAME_LEN).ok_or_else(|| corrupted("host"))?);
        let name = b
            .get(HOST_NAME..)
            .filter(|rest| rest.len() == n)
            .and_then(|rest| std::str::from_utf8(rest).ok())
            .filter(|s| valid_host_name(s))
            .ok_or_else(|| corrupted("host name"))?;
        Ok(HostRecord {
            name: name.to_string(),
            enrolled_ms,
            revoked_ms: (revoked != 0).then_some(revoked),
        })
    }
}

/// A volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Newest KEK version; versions are never reused.
    pub newest: KekVersion,
}

impl VolumeRecord {
    /// Encodes the record.
    pub fn encode(&self) -> [u8; VOL_LEN] {
        let mut b = [0u8; VOL_LEN];
        b[0] = RECORD_FORMAT;
        b[VOL_CREATED..VOL_NEWEST].copy_from_slice(&self.created_ms.to_be_bytes());
        b[VOL_NEWEST..].copy_from_slice(&self.newest.0.to_be_bytes());
        b
    }

    /// Decodes and validates a record.
    pub fn decode(b: &[u8]) -> Result<VolumeRecord, StorageError> {
        check_format(b, "volume")?;
        if b.len() != VOL_LEN {
            return Err(corrupted("volume"));
        }
        let created_ms = u64_at(b, VOL_CREATED).ok_or_else(|| corrupted("volume"))?;
        let newest = u32_at(b, VOL_NEWEST).ok_or_else(|| corrupted("volume"))?;
        if newest == 0 {
            return Err(corrupted("volume newest version"));
        }
        Ok(VolumeRecord {
            created_ms,
            newest: KekVersion(newest),
        })
    }
}

/// An outstanding challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChallengeRecord {
    /// The host it was issued to.
    pub host: HostId,
    /// Expiry, Unix ms.
    pub expires_ms: u64,
    /// Already presented once.
    pub used: bool,
}

impl ChallengeRecord {
    /// Encodes the record.
    pub fn encode(&self) -> [u8; CH_LEN] {
        let mut b = [0u8; CH_LEN];
        b[..CH_EXPIRES].copy_from_slice(&self.host.0);
        b[CH_EXPIRES..CH_USED].copy_from_slice(&self.expires_ms.to_be_bytes());
        b[CH_USED] = u8::from(self.used);
        b
    }

    /// Decodes and validates a record.
    pub fn decode(b: &[u8]) -> Result<ChallengeRecord, StorageError> {
        if b.len() != CH_LEN || b[CH_USED] > 1 {
            return Err(corrupted("challenge"));
        }
        let mut host = [0u8; 32];
        host.copy_from_slice(&b[..CH_EXPIRES]);
        Ok(ChallengeRecord {
            host: HostId(host),
            expires_ms: u64_at(b, CH_EXPIRES).ok_or_else(|| corrupted("challenge"))?,
            used: b[CH_USED] == 1,
        })
    }
}

/// Result of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done (a KEK released, an admin change made).
    Ok,
    /// Refused.
    Refused,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Unix ms.
    pub time_ms: u64,
    /// The host concerned (the claimed one for refusals before the signature
    /// was checked).
    pub host: Option<HostId>,
    /// The volume concerned.
    pub volume: Option<VolumeId>,
    /// KEK version concerned, 0 for none.
    pub version: u32,
    /// What was asked (`unlock`, `enroll`, ...).
    pub action: String,
    /// Result.
    pub outcome: Outcome,
    /// Refusal code and message, or detail.
    pub reason: String,
}

impl AuditRecord {
    /// Encodes the record; a reason longer than [`MAX_REASON`] bytes is cut
    /// at a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let action = &self.action.as_bytes()[..self.action.len().min(32)];
        let mut cut = self.reason.len().min(MAX_REASON);
        while !self.reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &self.reason.as_bytes()[..cut];
        let mut b = Vec::with_capacity(AU_ACTION + action.len() + 2 + reason.len());
        b.push(RECORD_FORMAT);
        b.extend_from_slice(&self.time_ms.to_be_bytes());
        b.push(u8::from(self.host.is_some()) | (u8::from(self.volume.is_some()) << 1));
        b.extend_from_slice(&self.host.map_or([0; 32], |h| h.0));
        b.extend_from_slice(&self.volume.map_or([0; 16], |v| v.0));
        b.extend_from_slice(&self.version.to_be_bytes());
        b.push(match self.outcome {
            Outcome::Ok => 0,
            Outcome::Refused => 1,
        });
        b.push(action.len() as u8);
        b.extend_from_slice(action);
        b.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        b.extend_from_slice(reason);
        b
    }

    /// Decodes and validates a record.
    pub fn decode(b: &[u8]) -> Result<AuditRecord, StorageError> {
        let bad = || corrupted("audit");
        check_format(b, "audit")?;
        let time_ms = u64_at(b, AU_TIME).ok_or_else(bad)?;
        let flags = *b.get(AU_FLAGS).ok_or_else(bad)?;
        let mut host = [0u8; 32];
        host.copy_from_slice(b.get(AU_HOST..AU_VOLUME).ok_or_else(bad)?);
        let mut volume = [0u8; 16];
        volume.copy_from_slice(b.get(AU_VOLUME..AU_VERSION).ok_or_else(bad)?);
        let version = u32_at(b, AU_VERSION).ok_or_else(bad)?;
        let outcome = match b.get(AU_OUTCOME) {
            Some(0) => Outcome::Ok,
            Some(1) => Outcome::Refused,
            _ => return Err(bad()),
        };
        let a = usize::from(*b.get(AU_ACTION_LEN).ok_or_else(bad)?);
        let action = b.get(AU_ACTION..AU_ACTION + a).ok_or_else(bad)?;
        let r_at = AU_ACTION + a;
        let r = usize::from(u16::from_be_bytes(
            b.get(r_at..r_at + 2)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ));
        let reason = b.get(r_at + 2..).filter(|s| s.len() == r).ok_or_else(bad)?;
        Ok(AuditRecord {
            time_ms,
            host: (flags & 1 != 0).then_some(HostId(host)),
            volume: (flags & 2 != 0).then_some(VolumeId(volume)),
            version,
            action: String::from_utf8(action.to_vec()).map_err(|_| bad())?,
            outcome,
            reason: String::from_utf8(reason.to_vec()).map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let h = HostRecord {
            name: "web-01.example".into(),
            enrolled_ms: 1_700_000_000_123,
            revoked_ms: Some(1_700_000_999_000),
        };
        assert_eq!(HostRecord::decode(&h.encode()), Ok(h.clone()));
        let v = VolumeRecord {
            created_ms: 5,
            newest: KekVersion(3),
        };
        assert_eq!(VolumeRecord::decode(&v.encode()), Ok(v));
        let c = ChallengeRecord {
            host: HostId([4; 32]),
            expires_ms: 99,
            used: true,
        };
        assert_eq!(ChallengeRecord::decode(&c.encode()), Ok(c));
        let a = AuditRecord {
            time_ms: 7,
            host: Some(HostId([1; 32])),
            volume: None,
            version: 2,
            action: "unlock".into(),
            outcome: Outcome::Refused,
            reason: "revoked: host was revoked".into(),
        };
        assert_eq!(AuditRecord::decode(&a.encode()), Ok(a));
    }

    #[test]
    fn truncated_and_bad_records_are_errors() {
        let h = HostRecord {
            name: "a".into(),
            enrolled_ms: 1,
            revoked_ms: None,
        }
        .encode();
        for n in 0..h.len() {
            assert!(HostRecord::decode(&h[..n]).is_err());
        }
        let mut wrong_format = h.clone();
        wrong_format[0] = 2;
        assert!(matches!(
            HostRecord::decode(&wrong_format),
            Err(StorageError::Corrupted(m)) if m.contains("want=1 have=2")
        ));
        let a = AuditRecord {
            time_ms: 7,
            host: None,
            volume: Some(VolumeId([2; 16])),
            version: 0,
            action: "create-volume".into(),
            outcome: Outcome::Ok,
            reason: String::new(),
        }
        .encode();
        for n in 0..a.len() {
            assert!(AuditRecord::decode(&a[..n]).is_err());
        }
        assert!(VolumeRecord::decode(&[1; 12]).is_err());
        assert!(ChallengeRecord::decode(&[2; 41]).is_err());
    }

    #[test]
    fn long_reason_is_cut_on_a_char_boundary() {
        let a = AuditRecord {
            time_ms: 0,
            host: None,
            volume: None,
            version: 0,
            action: "x".into(),
            outcome: Outcome::Ok,
            reason: "é".repeat(MAX_REASON),
        };
        let back = AuditRecord::decode(&a.encode()).unwrap();
        assert_eq!(back.reason.len(), MAX_REASON);
    }

    #[test]
    fn host_names() {
        assert!(valid_host_name("db-1.prod_eu"));
        for bad in ["", "a b", "é", &"a".repeat(65), &"ab".repeat(32)] {
            assert!(!valid_host_name(bad), "{bad}");
        }
    }
}
