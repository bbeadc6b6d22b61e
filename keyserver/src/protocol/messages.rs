//! JSON bodies of the HTTP API and their parsers. Parsers take raw bytes,
//! enforce the size limit, reject unknown fields, and return validated types.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::ids::decode_hex;
use super::{
    HostId, KekVersion, Op, ProtocolError, SealedKek, SignedRequest, MAX_BODY, MAX_RESPONSE,
};

/// `POST /v1/challenge` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// Host id, 64 hex digits.
    pub host: String,
}

/// `POST /v1/challenge` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeResponse {
    /// 32 random bytes, 64 hex digits.
    pub challenge: String,
    /// Expiry, Unix time in seconds.
    pub expires: u64,
}

/// Body of `POST /v1/register`, `/v1/unlock` and `/v1/rewrapped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRequestBody {
    /// Host id, 64 hex digits.
    pub host: String,
    /// Volume id, 32 hex digits.
    pub volume: String,
    /// KEK version, at least 1.
    pub version: u32,
    /// Challenge, 64 hex digits.
    pub challenge: String,
    /// Client one-time X25519 public key, 64 hex digits.
    pub client_key: String,
    /// Ed25519 signature, 128 hex digits.
    pub signature: String,
}

/// A KEK sealed with HPKE, as sent in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedKekBody {
    /// KEK version.
    pub version: u32,
    /// HPKE encapsulated key, 64 hex digits.
    pub enc: String,
    /// HPKE ciphertext (32-byte KEK + 16-byte tag), 96 hex digits.
    pub ct: String,
}

/// Response of `register` and `unlock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyResponse {
    /// The version asked for.
    pub kek: SealedKekBody,
    /// The newest version, when it is newer than the one asked for.
    pub newest: Option<SealedKekBody>,
    /// The volume was declared compromised: the host must seal its data
    /// again under a new data key (`lsvfs rekey`) and report `rekeyed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rekey: bool,
}

/// Response of `rekeyed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeyedResponse {
    /// A compromise mark was cleared.
    pub cleared: bool,
}

/// Response of `rewrapped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewrappedResponse {
    /// The version now recorded for this host and volume.
    pub wrapped_version: u32,
    /// KEK versions deleted because no authorized host needs them any more.
    pub retired: Vec<u32>,
}

/// Response of `erase`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasedResponse {
    /// The KEK versions destroyed.
    pub destroyed: Vec<u32>,
}

/// Body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// A refusal code ([`super::Refusal::code`]) or a transport-level code
    /// (`payload_too_large`, `unsupported_media_type`, `not_found`,
    /// `method_not_allowed`, `unavailable`, `internal`).
    pub error: String,
    /// Human-readable detail; never contains key material.
    pub message: String,
}

fn parse_json<T: DeserializeOwned>(body: &[u8], limit: usize) -> Result<T, ProtocolError> {
    if body.len() > limit {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    serde_json::from_slice(body).map_err(|e| ProtocolError::Json(e.to_string()))
}

/// Parses and validates a `challenge` request.
pub fn parse_challenge_request(body: &[u8]) -> Result<HostId, ProtocolError> {
    let req: ChallengeRequest = parse_json(body, MAX_BODY)?;
    HostId::from_hex(&req.host)
}

/// Parses and validates a signed request for `op`.
pub fn parse_signed_request(op: Op, body: &[u8]) -> Result<SignedRequest, ProtocolError> {
    let req: SignedRequestBody = parse_json(body, MAX_BODY)?;
    SignedRequest::from_body(op, &req)
}

/// Client side: parses a challenge response.
pub fn parse_challenge_response(body: &[u8]) -> Result<super::Challenge, ProtocolError> {
    let resp: ChallengeResponse = parse_json(body, MAX_RESPONSE as usize)?;
    super::Challenge::from_hex(&resp.challenge)
}

impl SealedKekBody {
    /// Validates the hex fields.
    pub fn decode(&self) -> Result<SealedKek, ProtocolError> {
        if self.version == 0 {
            return Err(ProtocolError::Invalid {
                field: "version",
                reason: "versions start at 1",
            });
        }
        Ok(SealedKek {
            version: KekVersion(self.version),
            enc: decode_hex::<32>("enc", &self.enc)?,
            ct: decode_hex::<48>("ct", &self.ct)?,
        })
    }
}

impl From<&SealedKek> for SealedKekBody {
    fn from(s: &SealedKek) -> Self {
        SealedKekBody {
            version: s.version.0,
            enc: hex::encode(s.enc),
            ct: hex::encode(s.ct),
        }
    }
}

/// Client side: parses a `register`/`unlock` response into the sealed KEK
/// and the optional sealed newest KEK.
pub fn parse_key_response(
    body: &[u8],
) -> Result<(SealedKek, Option<SealedKek>, bool), ProtocolError> {
    let resp: KeyResponse = parse_json(body, MAX_RESPONSE as usize)?;
    let kek = resp.kek.decode()?;
    let newest = resp
        .newest
        .as_ref()
        .map(SealedKekBody::decode)
        .transpose()?;
    if let Some(n) = &newest {
        if n.version <= kek.version {
            return Err(ProtocolError::Invalid {
                field: "newest",
                reason: "not newer than the version asked for",
            });
        }
    }
    Ok((kek, newest, resp.rekey))
}

/// Client side: parses a `rewrapped` response.
pub fn parse_rewrapped_response(body: &[u8]) -> Result<RewrappedResponse, ProtocolError> {
    parse_json(body, MAX_RESPONSE as usize)
}

/// Client side: parses an `erase` response.
pub fn parse_erased_response(body: &[u8]) -> Result<ErasedResponse, ProtocolError> {
    parse_json(body, MAX_RESPONSE as usize)
}

/// Client side: parses a `rekeyed` response.
pub fn parse_rekeyed_response(body: &[u8]) -> Result<RekeyedResponse, ProtocolError> {
    parse_json(body, MAX_RESPONSE as usize)
}

/// Client side: parses an error body.
pub fn parse_error_body(body: &[u8]) -> Result<ErrorBody, ProtocolError> {
    parse_json(body, MAX_RESPONSE as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_request_validation() {
        let host = "ab".repeat(32);
        let ok = format!(r#"{{"host":"{host}"}}"#);
        assert_eq!(
            parse_challenge_request(ok.as_bytes()),
            Ok(HostId([0xab; 32]))
        );
        for bad in [
            "".to_string(),
            "{}".to_string(),
            "null".to_string(),
            r#"{"host":1}"#.to_string(),
            r#"{"host":"abcd"}"#.to_string(),
            format!(r#"{{"host":"{host}","extra":1}}"#),
            format!(r#"{{"host":"{host}"}} trailing"#),
        ] {
            assert!(parse_challenge_request(bad.as_bytes()).is_err(), "{bad}");
        }
        let big = vec![b' '; MAX_BODY + 1];
        assert_eq!(
            parse_challenge_request(&big),
            Err(ProtocolError::TooLarge(MAX_BODY + 1))
        );
    }

    #[test]
    fn key_response_rejects_older_newest() {
        let body = |v: u32, n: u32| {
            serde_json::to_vec(&KeyResponse {
                kek: SealedKekBody {
                    version: v,
                    enc: "00".repeat(32),
                    ct: "00".repeat(48),
                },
                newest: Some(SealedKekBody {
                    version: n,
                    enc: "00".repeat(32),
                    ct: "00".repeat(48),
                }),
                rekey: false,
            })
            .unwrap()
        };
        assert!(parse_key_response(&body(1, 2)).is_ok());
        assert!(parse_key_response(&body(2, 2)).is_err());
        assert!(parse_key_response(&body(0, 2)).is_err());
    }
}
