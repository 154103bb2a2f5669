//! The HTTP face of errors: `{"error":{"code","message"}}` with the status of SPEC §5, and
//! `Retry-After` on `429`. [`ApiError`] wraps the wire error both client APIs share
//! ([`WireError`]), so a socket's `error` frame and an HTTP error body say the same.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use confab_shared::link::CellError;
use confab_shared::wire::WireError;
use confab_shared::ErrorCode;
use serde_json::json;

/// An error answered over HTTP: a [`WireError`] (its fields are reached through it).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ApiError(pub WireError);

impl std::ops::Deref for ApiError {
    type Target = WireError;
    fn deref(&self) -> &WireError {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut WireError {
        &mut self.0
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(WireError::new(code, message))
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

impl From<CellError> for ApiError {
    fn from(e: CellError) -> Self {
        ApiError(e.into())
    }
}

impl From<confab_directory::EngineError> for ApiError {
    fn from(e: confab_directory::EngineError) -> Self {
        ApiError::unavailable(e.to_string())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        metrics::counter!(crate::metrics::ERRORS, "code" => self.code.as_str()).increment(1);
        let mut response = HttpResponse::build(self.status_code());
        if let Some(ms) = self.retry_after_ms {
            response.insert_header(("Retry-After", ms.div_ceil(1000).max(1).to_string()));
        }
        response.json(json!({ "error": self.to_json() }))
    }
}

/// Turns actix-web's own extraction failures (bad JSON, oversize body, bad query) into SPEC
/// errors.
pub fn json_error(err: actix_web::error::JsonPayloadError) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    let api = match &err {
        E::Overflow { .. } | E::OverflowKnownLength { .. } => {
            ApiError::new(ErrorCode::TooLarge, "request body is too large")
        }
        E::ContentType => ApiError::bad_request("expected Content-Type: application/json"),
        other => ApiError::bad_request(format!("invalid JSON body: {other}")),
    };
    api.into()
}

/// Query-string extraction failures.
pub fn query_error(err: actix_web::error::QueryPayloadError) -> actix_web::Error {
    ApiError::bad_request(format!("invalid query: {err}")).into()
}

/// Path extraction failures (e.g. an id with forbidden characters).
pub fn path_error(err: actix_web::error::PathError) -> actix_web::Error {
    ApiError::bad_request(format!("invalid path: {err}")).into()
}
