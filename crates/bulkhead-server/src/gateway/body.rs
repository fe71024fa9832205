//! The bodies of a proxied call, streamed in both directions.
//!
//! [`LimitBody`] passes the agent's request body to the upstream chunk by chunk and fails once
//! it exceeds the upstream's limit. [`Relay`] passes the upstream's answer to the agent chunk by
//! chunk, with a read timeout between chunks and a deadline for the whole call, feeding a
//! [`Meter`] on the way; when the answer ends (or fails, or the agent hangs up and the relay is
//! dropped) it records the call's cost in its bill, which the lease flusher settles.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bulkhead_core::Micros;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::bill::Bill;
use super::config::TokenPrices;
use super::meter::Meter;
use crate::upstream_http::pool::Conn;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The agent's request body, cut off (with an error) past `limit` bytes.
pub struct LimitBody {
    inner: axum::body::Body,
    left: u64,
    over: Arc<AtomicBool>,
}

impl LimitBody {
    pub fn new(inner: axum::body::Body, limit: u64, over: Arc<AtomicBool>) -> LimitBody {
        LimitBody { inner, left: limit, over }
    }
}

impl Body for LimitBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if n > this.left {
                        this.over.store(true, Ordering::SeqCst);
                        return Poll::Ready(Some(Err("the request body is over the upstream's limit".into())));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How the relay settles, when it settles at all.
pub struct Metering {
    pub meter: Meter,
    pub prices: TokenPrices,
    pub bill: Bill,
}

impl Metering {
    /// The cost once the answer is over (or abandoned): the metered usage, else the whole hold.
    fn cost(&self) -> Micros {
        let held = self.bill.held();
        self.meter.usage().and_then(|u| self.prices.cost(&u)).unwrap_or(held)
    }
}

enum Phase {
    Streaming,
    Done,
}

/// The upstream's answer on its way to the agent.
pub struct Relay {
    inner: hyper::body::Incoming,
    metering: Option<Metering>,
    read_timeout: Duration,
    deadline: Instant,
    /// The timers, set the first time the upstream makes the relay wait (an answer that is
    /// there at once never needs them).
    timers: Option<Timers>,
    phase: Phase,
    upstream: Arc<str>,
    /// The connection the answer comes on, given back to its pool after the body (declared
    /// after `inner`, so dropped after it).
    _conn: Option<Conn>,
}

struct Timers {
    idle: Pin<Box<Sleep>>,
    deadline: Pin<Box<Sleep>>,
}

impl Relay {
    pub fn new(
        inner: hyper::body::Incoming,
        metering: Option<Metering>,
        read_timeout: Duration,
        deadline: Instant,
        upstream: Arc<str>,
        conn: Option<Conn>,
    ) -> Relay {
        Relay { inner, metering, read_timeout, deadline, timers: None, phase: Phase::Streaming, upstream, _conn: conn }
    }

    /// The upstream failed mid-answer (a read timeout, `max_duration`, a broken connection):
    /// settle as for any answer — the usage if it was read, else the whole hold, since the
    /// upstream did the work it was sent (contract §12) — and end the agent's body with an
    /// error, so it sees a cut answer rather than a short one.
    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::warn!(upstream = %self.upstream, error = %why, "upstream answer failed mid-body");
        if let Some(m) = self.metering.take() {
            let cost = m.cost();
            m.bill.finish(cost);
        }
        self.phase = Phase::Done;
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match &mut this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Streaming => {}
            }
            let late = match &mut this.timers {
                Some(t) => t.deadline.as_mut().poll(cx).is_ready(),
                None => Instant::now() >= this.deadline,
            };
            if late {
                return this.fail("the call took longer than the upstream's max_duration".into());
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    let (read_timeout, deadline) = (this.read_timeout, this.deadline);
                    let t = this.timers.get_or_insert_with(|| Timers {
                        idle: Box::pin(tokio::time::sleep(read_timeout)),
                        deadline: Box::pin(tokio::time::sleep_until(deadline)),
                    });
                    if t.deadline.as_mut().poll(cx).is_ready() {
                        return this.fail("the call took longer than the upstream's max_duration".into());
                    }
                    if t.idle.as_mut().poll(cx).is_ready() {
                        return this.fail("no data from the upstream within its read_timeout".into());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(t) = &mut this.timers {
                        t.idle.as_mut().reset(Instant::now() + this.read_timeout);
                    }
                    match frame.into_data() {
                        Ok(data) => {
                            let out = match &mut this.metering {
                                Some(m) => m.meter.feed(data),
                                None => data,
                            };
                            if out.is_empty() {
                                continue;
                            }
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    }
                }
                Poll::Ready(Some(Err(e))) => return this.fail(format!("{e}")),
                Poll::Ready(None) => {
                    let mut tail = Bytes::new();
                    if let Some(mut m) = this.metering.take() {
                        tail = m.meter.finish();
                        let cost = m.cost();
                        m.bill.finish(cost);
                    }
                    this.phase = Phase::Done;
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn size_hint(&self) -> SizeHint {
        // Never exact while metering: the agent's body ends only after the settlement.
        if self.metering.is_some() { SizeHint::default() } else { self.inner.size_hint() }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(m) = self.metering.take() {
            // The agent hung up before the answer ended: charge what was read, else the hold.
            let cost = m.cost();
            tracing::debug!(upstream = %self.upstream, %cost, "agent left mid-answer; settling");
            m.bill.finish(cost);
        }
    }
}
