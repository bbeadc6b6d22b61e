//! HTTP side of the server: the accept loop, the route table, and the one
//! mapping from errors to status codes.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::{AppState, CONNECTION_LIFETIME, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
use crate::protocol::{
    parse_challenge_request, parse_signed_request, ChallengeResponse, ErasedResponse, ErrorBody,
    KeyResponse, Op, Refusal, RekeyedResponse, RewrappedResponse, SealedKekBody, MAX_BODY,
};
use crate::storage::SignedOutcome;

/// Time allowed to receive a request's headers, and then its body.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a path does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Challenge,
    Signed(Op),
}

/// The whole HTTP API. Every route is `POST` with a JSON body.
const ROUTES: &[(&str, Route)] = &[
    ("/v1/challenge", Route::Challenge),
    ("/v1/register", Route::Signed(Op::Register)),
    ("/v1/unlock", Route::Signed(Op::Unlock)),
    ("/v1/rewrapped", Route::Signed(Op::Rewrapped)),
    ("/v1/erase", Route::Signed(Op::Erase)),
    ("/v1/rekeyed", Route::Signed(Op::Rekeyed)),
];

/// Every way a request can fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// A refusal (protocol-level, audited unless malformed).
    Refused(Refusal, String),
    /// Body larger than [`MAX_BODY`].
    PayloadTooLarge,
    /// `Content-Type` is not `application/json`.
    UnsupportedMediaType,
    /// No such path.
    NotFound,
    /// Known path, method other than `POST`.
    MethodNotAllowed,
    /// Temporarily out of capacity (too many outstanding challenges).
    Unavailable(String),
    /// A server-side failure (database); detail logged, not sent.
    Internal,
}

impl ApiError {
    /// The one mapping to HTTP status codes.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Refused(r, _) => match r {
                Refusal::BadRequest => StatusCode::BAD_REQUEST,
                Refusal::BadSignature | Refusal::ChallengeExpired | Refusal::ChallengeReplayed => {
                    StatusCode::UNAUTHORIZED
                }
                Refusal::NotEnrolled | Refusal::Revoked | Refusal::NotAuthorized => {
                    StatusCode::FORBIDDEN
                }
                Refusal::UnknownVolume | Refusal::UnknownVersion => StatusCode::NOT_FOUND,
                Refusal::VolumeExists => StatusCode::CONFLICT,
            },
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> ErrorBody {
        let (error, message) = match self {
            ApiError::Refused(r, m) => (r.code(), m.clone()),
            ApiError::PayloadTooLarge => (
                "payload_too_large",
                format!("request bodies are limited to {MAX_BODY} bytes"),
            ),
            ApiError::UnsupportedMediaType => (
                "unsupported_media_type",
                "Content-Type must be application/json".into(),
            ),
            ApiError::NotFound => ("not_found", "no such endpoint".into()),
            ApiError::MethodNotAllowed => ("method_not_allowed", "use POST".into()),
            ApiError::Unavailable(m) => ("unavailable", m.clone()),
            ApiError::Internal => ("internal", "internal error; see the server log".into()),
        };
        ErrorBody {
            error: error.to_string(),
            message,
        }
    }
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError::Refused(Refusal::BadRequest, e.to_string())
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
    mut stopped: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stopped.changed() => return,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

async fn handle(state: &AppState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match dispatch(state, req).await {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = json_response(e.status(), &e.body());
            if e == ApiError::PayloadTooLarge {
                // The rest of the body was not read: the connection cannot
                // carry another request.
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            resp
        }
    }
}

/// Reads the whole body (up to the limit) before any other check, so that a
/// refused request still leaves the connection reusable.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let limited = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge),
        Ok(Err(e)) => Err(bad_request(format!("reading the body: {e}"))),
        Err(_) => Err(bad_request("timed out reading the body")),
    }
}

async fn dispatch(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let route = ROUTES
        .iter()
        .find(|(path, _)| *path == req.uri().path())
        .map(|&(_, r)| r);
    let post = req.method() == Method::POST;
    let json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let body = read_body(req).await?;
    let route = route.ok_or(ApiError::NotFound)?;
    if !post {
        return Err(ApiError::MethodNotAllowed);
    }
    if !json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let internal = |e: crate::storage::StorageError| {
        tracing::error!("database: {e}");
        ApiError::Internal
    };
    match route {
        Route::Challenge => {
            let host = parse_challenge_request(&body).map_err(bad_request)?;
            let Some((challenge, expires_ms)) = state
                .store
                .issue_challenge(host, state.challenge_lifetime)
                .await
                .map_err(internal)?
            else {
                return Err(ApiError::Unavailable(
                    "too many outstanding challenges; retry shortly".into(),
                ));
            };
            Ok(json_response(
                StatusCode::OK,
                &ChallengeResponse {
                    challenge: challenge.to_hex(),
                    expires: expires_ms / 1000,
                },
            ))
        }
        Route::Signed(op) => {
            let req = parse_signed_request(op, &body).map_err(bad_request)?;
            let signature_ok = req.verify();
            match state
                .store
                .signed(req, signature_ok)
                .await
                .map_err(internal)?
            {
                SignedOutcome::Released { kek, newest, rekey } => Ok(json_response(
                    StatusCode::OK,
                    &KeyResponse {
                        kek: SealedKekBody::from(&kek),
                        newest: newest.as_ref().map(SealedKekBody::from),
                        rekey,
                    },
                )),
                SignedOutcome::Rekeyed { cleared } => {
                    Ok(json_response(StatusCode::OK, &RekeyedResponse { cleared }))
                }
                SignedOutcome::Rewrapped { wrapped, retired } => Ok(json_response(
                    StatusCode::OK,
                    &RewrappedResponse {
                        wrapped_version: wrapped.0,
                        retired: retired.into_iter().map(|v| v.0).collect(),
                    },
                )),
                SignedOutcome::Erased { destroyed } => Ok(json_response(
                    StatusCode::OK,
                    &ErasedResponse {
                        destroyed: destroyed.into_iter().map(|v| v.0).collect(),
                    },
                )),
                SignedOutcome::Refused(r, m) => Err(ApiError::Refused(r, m)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_status_and_code() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (
                ApiError::Refused(Refusal::NotEnrolled, String::new()),
                403,
                "not_enrolled",
            ),
            (
                ApiError::Refused(Refusal::Revoked, String::new()),
                403,
                "revoked",
            ),
            (
                ApiError::Refused(Refusal::NotAuthorized, String::new()),
                403,
                "not_authorized",
            ),
            (
                ApiError::Refused(Refusal::UnknownVolume, String::new()),
                404,
                "unknown_volume",
            ),
            (
                ApiError::Refused(Refusal::UnknownVersion, String::new()),
                404,
                "unknown_version",
            ),
            (
                ApiError::Refused(Refusal::ChallengeExpired, String::new()),
                401,
                "challenge_expired",
            ),
            (
                ApiError::Refused(Refusal::ChallengeReplayed, String::new()),
                401,
                "challenge_replayed",
            ),
            (
                ApiError::Refused(Refusal::BadSignature, String::new()),
                401,
                "bad_signature",
            ),
            (
                ApiError::Refused(Refusal::BadRequest, String::new()),
                400,
                "bad_request",
            ),
            (
                ApiError::Refused(Refusal::VolumeExists, String::new()),
                409,
                "volume_exists",
            ),
            (ApiError::PayloadTooLarge, 413, "payload_too_large"),
            (
                ApiError::UnsupportedMediaType,
                415,
                "unsupported_media_type",
            ),
            (ApiError::NotFound, 404, "not_found"),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
            (ApiError::Unavailable(String::new()), 503, "unavailable"),
            (ApiError::Internal, 500, "internal"),
        ];
        assert_eq!(
            cases
                .iter()
                .filter(|(e, ..)| matches!(e, ApiError::Refused(..)))
                .count(),
            Refusal::ALL.len()
        );
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.body().error, code, "{e:?}");
            if let ApiError::Refused(r, _) = e {
                assert_eq!(Refusal::from_code(code), Some(r));
            }
        }
    }

    #[test]
    fn routes_are_unique_and_versioned() {
        for (i, (p, _)) in ROUTES.iter().enumerate() {
            assert!(p.starts_with("/v1/"));
            assert!(ROUTES[i + 1..].iter().all(|(q, _)| q != p));
        }
        for op in Op::ALL {
            assert!(ROUTES.contains(&(op.path(), Route::Signed(op))));
        }
    }
}
