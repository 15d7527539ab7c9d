//! `GET /users/{id}/preferences/events`: one user's changes as server-sent events, fed by
//! the process's [`Hub`](super::events::Hub).

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, header};
use passerelle_redis::preferences::Stored;

use super::Shared;
use super::access::Access;
use super::error::PrefError;
use super::events::{self, Signal};
use super::schema::{self, Schema};

/// `GET /users/{id}/preferences/events`: see [`events`].
pub(super) async fn stream(
    State(s): State<Shared>,
    Access { user, .. }: Access,
    headers: HeaderMap,
) -> Result<Response, PrefError> {
    let last_seen: Option<u64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    // Listen before reading, so no change falls between the read and the first message.
    let listener = s.hub.listen(&user);
    let stored = s.read(&user).await?;
    let heartbeat = s.schema.config().heartbeat.get();
    let events = event_stream(s.clone(), user, listener, stored, last_seen);
    let mut res = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat).text("keep-alive"))
        .into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx and similar proxies must not buffer the stream.
    res.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

fn document_event(schema: &Schema, user: &str, stored: &Stored) -> Event {
    let doc = schema.document(user, stored);
    Event::default()
        .event("document")
        .id(stored.version.to_string())
        .json_data(&doc)
        .unwrap_or_default()
}

fn event_stream(
    s: Shared,
    user: String,
    listener: events::Listener,
    first: Stored,
    last_seen: Option<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct St {
        s: Shared,
        user: String,
        listener: events::Listener,
        sent: u64,
        pending: Option<Event>,
    }
    let pending =
        (last_seen != Some(first.version)).then(|| document_event(&s.schema, &user, &first));
    let st = St {
        sent: first.version,
        pending,
        s,
        user,
        listener,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        if let Some(e) = st.pending.take() {
            return Some((Ok(e), st));
        }
        loop {
            let signal = match st.listener.rx.recv().await {
                Ok(sig) => sig,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Signal::Resync,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            match signal {
                // The next version: what it changed is all the client lacks.
                Signal::Changed(a) if a.version == st.sent + 1 => {
                    st.sent = a.version;
                    let (values, sources) = st.s.schema.changed_values(&a.changed);
                    let data = schema::Change {
                        version: a.version,
                        values,
                        sources,
                    };
                    let e = Event::default()
                        .event("change")
                        .id(a.version.to_string())
                        .json_data(&data)
                        .unwrap_or_default();
                    return Some((Ok(e), st));
                }
                // Already sent (a document covered it), or announced out of order.
                Signal::Changed(a) if a.version <= st.sent => continue,
                // A version skipped: its announcement is late or lost; read the document.
                Signal::Changed(_) | Signal::Resync => {
                    // Missed messages are unknown: the document, when it moved.
                    let Ok(stored) = st.s.read(&st.user).await else {
                        continue;
                    };
                    if stored.version != st.sent {
                        st.sent = stored.version;
                        let e = document_event(&st.s.schema, &st.user, &stored);
                        return Some((Ok(e), st));
                    }
                }
            }
        }
    })
}
