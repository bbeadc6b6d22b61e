//! Wire protocol shared by the client and the server: message types, the
//! signed byte layout, HPKE sealing of KEKs, and validation of every request.
//!
//! docs/PROTOCOL.md is the normative description; this module implements it.
//! Nothing here touches the network or the disk, so it builds without any
//! feature and is what the fuzz target drives.

mod ids;
mod messages;
mod seal;
mod signed;

pub use ids::{Challenge, HostId, KekVersion, VolumeId};
pub use messages::{
    parse_challenge_request, parse_challenge_response, parse_erased_response, parse_error_body,
    parse_key_response, parse_rekeyed_response, parse_rewrapped_response, parse_signed_request,
    ChallengeRequest, ChallengeResponse, ErasedResponse, ErrorBody, KeyResponse, RekeyedResponse,
    RewrappedResponse, SealedKekBody, SignedRequestBody,
};
pub use seal::{open_kek, seal_kek, Recipient, SealedKek, KEK_INFO_LABEL};
pub use signed::{Op, SignedRequest, SIGNED_PREFIX};

/// Protocol version; it is also the `/v1/` path prefix and part of every
/// signed message and HPKE `info` string.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request body the server reads; larger ones get 413.
pub const MAX_BODY: usize = 16 * 1024;

/// Largest response body the client reads.
pub const MAX_RESPONSE: u64 = 64 * 1024;

/// Why a request is malformed. Every variant maps to `bad_request` (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The body is not JSON of the expected shape (unknown or missing fields,
    /// wrong types, trailing bytes).
    #[error("malformed JSON: {0}")]
    Json(String),
    /// A hex field has the wrong length or a non-hex digit.
    #[error("field `{field}`: expected {expected} hex digits")]
    Hex {
        /// JSON field name.
        field: &'static str,
        /// Number of hex digits the field must have.
        expected: usize,
    },
    /// A field is well-formed but its value is not allowed.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// JSON field name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The body is larger than [`MAX_BODY`].
    #[error("body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    TooLarge(usize),
    /// HPKE sealing or opening failed (bad recipient key, tampered ciphertext).
    #[error("HPKE {0} failed")]
    Seal(&'static str),
}

/// Why the server refused a well-formed request. The codes are stable: they
/// are the `error` field of refusal bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The host id is not enrolled.
    NotEnrolled,
    /// The host was revoked by an administrator.
    Revoked,
    /// The host is enrolled but not on the volume's ACL.
    NotAuthorized,
    /// No volume has this id.
    UnknownVolume,
    /// The volume has no KEK of this version (never created, or retired).
    UnknownVersion,
    /// The challenge is unknown, expired, or was issued to another host.
    ChallengeExpired,
    /// The challenge was already used.
    ChallengeReplayed,
    /// The Ed25519 signature does not verify under the host id.
    BadSignature,
    /// The request is malformed.
    BadRequest,
    /// `register` for a volume id that already exists.
    VolumeExists,
}

impl Refusal {
    /// Every refusal, for tests and documentation.
    pub const ALL: [Refusal; 10] = [
        Refusal::NotEnrolled,
        Refusal::Revoked,
        Refusal::NotAuthorized,
        Refusal::UnknownVolume,
        Refusal::UnknownVersion,
        Refusal::ChallengeExpired,
        Refusal::ChallengeReplayed,
        Refusal::BadSignature,
        Refusal::BadRequest,
        Refusal::VolumeExists,
    ];

    /// The stable code sent as `error`.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::NotEnrolled => "not_enrolled",
            Refusal::Revoked => "revoked",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::UnknownVolume => "unknown_volume",
            Refusal::UnknownVersion => "unknown_version",
            Refusal::ChallengeExpired => "challenge_expired",
            Refusal::ChallengeReplayed => "challenge_replayed",
            Refusal::BadSignature => "bad_signature",
            Refusal::BadRequest => "bad_request",
            Refusal::VolumeExists => "volume_exists",
        }
    }

    /// Inverse of [`Refusal::code`].
    pub fn from_code(code: &str) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// Runs every request parser over `data`; the fuzz target and the fuzz smoke
/// test call this. The first byte picks the parser, the rest is the body.
/// Valid signed requests are also checked for a round trip through JSON and
/// for a signature check that must not panic.
pub fn fuzz_request(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match usize::from(selector) % (Op::ALL.len() + 1) {
        0 => {
            if let Ok(req) = parse_challenge_request(body) {
                let again = serde_json::to_vec(&ChallengeRequest { host: req.to_hex() })
                    .expect("serializing a struct of strings cannot fail");
                assert_eq!(parse_challenge_request(&again), Ok(req));
            }
        }
        n => {
            let op = Op::ALL[n - 1];
            if let Ok(req) = parse_signed_request(op, body) {
                let again = serde_json::to_vec(&req.to_body())
                    .expect("serializing a struct of strings cannot fail");
                assert_eq!(parse_signed_request(op, &again).as_ref(), Ok(&req));
                let _ = req.verify();
            }
        }
    }
}
