//! A deadline on HTTP request bodies.
//!
//! actix-http bounds the time to receive a request's headers (`408` beyond), but not its body:
//! a client can send headers announcing a body and then trickle it a byte at a time, holding a
//! connection and a handler for as long as it likes. [`guard`] replaces the body of every
//! request that has one with a stream that fails once the deadline passes, and [`finish`]
//! answers such a request `408` and closes its connection, whatever the handler made of the
//! failed read.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::BoxBody;
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::{header, StatusCode};
use actix_web::web::Bytes;
use actix_web::{HttpMessage, HttpResponse};
use confab_shared::ErrorCode;
use futures_util::Stream;

use crate::metrics as m;

/// The body of a request that timed out, kept until its response is written: while it lives,
/// actix-http closes the connection after the response instead of draining the rest of the
/// body from the client, which could again take forever.
type Expired = Rc<RefCell<Option<Payload>>>;

/// A guarded request: what [`finish`] needs to know.
pub struct Guard {
    expired: Expired,
    timeout: Duration,
}

/// Puts a deadline of `timeout` on the body of `req`, if it has one.
pub fn guard(req: &mut ServiceRequest, timeout: Duration) -> Option<Guard> {
    if !has_body(req) {
        return None;
    }
    let expired: Expired = Rc::new(RefCell::new(None));
    let body = DeadlineBody {
        inner: Some(req.take_payload()),
        deadline: Box::pin(tokio::time::sleep(timeout)),
        expired: Rc::clone(&expired),
    };
    req.set_payload(Payload::Stream {
        payload: Box::pin(body),
    });
    Some(Guard { expired, timeout })
}

/// Calls `service` with `req` under the body deadline: the middleware of the application.
pub fn call<S>(
    mut req: ServiceRequest,
    service: &S,
    timeout: Duration,
) -> impl Future<Output = Result<ServiceResponse<BoxBody>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
{
    let guard = guard(&mut req, timeout);
    let response = service.call(req);
    async move { Ok(finish(response.await?, guard)) }
}

/// Replaces the response of a request whose body timed out with `408`, on a connection that
/// then closes.
pub fn finish(res: ServiceResponse<BoxBody>, guard: Option<Guard>) -> ServiceResponse<BoxBody> {
    let Some(body) = guard.and_then(|g| g.expired.borrow_mut().take().map(|b| (b, g.timeout)))
    else {
        return res;
    };
    let (payload, timeout) = body;
    metrics::counter!(m::SLOW_BODIES).increment(1);
    metrics::counter!(m::ERRORS, "code" => ErrorCode::BadRequest.as_str()).increment(1);
    tracing::debug!(path = %res.request().path(), "request body too slow");
    let mut response = HttpResponse::build(StatusCode::REQUEST_TIMEOUT)
        .force_close()
        .json(serde_json::json!({"error": {
            "code": ErrorCode::BadRequest.as_str(),
            "message": format!("the request body did not arrive within {} ms", timeout.as_millis()),
        }}));
    response.extensions_mut().insert(KeptBody(payload));
    res.into_response(response)
}

/// Holds a timed-out body in its response's extensions (see [`Expired`]).
struct KeptBody(#[allow(dead_code)] Payload);

fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// A request body that fails with `TimedOut` once its deadline passes.
struct DeadlineBody {
    inner: Option<Payload>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Expired,
}

impl Stream for DeadlineBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(item) = Pin::new(inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        if this.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        *this.expired.borrow_mut() = this.inner.take();
        Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "request body did not arrive in time",
        )))))
    }
}
