//! The duties to pay that travel with a call's slot, settled when the answer ends or, should the
//! call be dropped first, by their `Drop`: [`Bill`] for a slot a call forwards with, `Taken`
//! for the first slot of a new lease on its way to the call that asked for it.

use std::sync::Arc;

use bulkhead_core::Micros;

use super::lease::{Lease, Leases, lock};
use crate::metrics::GATEWAY_COST_CAPPED;

/// The first slot of a new lease on its way to the call that asked for it: if the call is gone
/// before it takes it, the slot goes back to the lease.
pub(super) struct Taken {
    pub(super) leases: Leases,
    pub(super) lease: Option<Arc<Lease>>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            {
                let mut st = lock(&lease.state);
                st.free += 1;
                st.taken = st.taken.saturating_sub(1);
                st.in_flight = st.in_flight.saturating_sub(1);
            }
            // A lease retired meanwhile is settled (and closed) by the flusher.
            self.leases.enqueue(&lease);
        }
    }
}

/// The duty to pay for one forwarded call. Dropped without [`Bill::finish`], it pays its
/// `abandoned` amount: the whole slot when the cost is metered from the answer (the usage was
/// never read), the price for a fixed-price upstream.
pub struct Bill {
    leases: Leases,
    lease: Arc<Lease>,
    abandoned: Micros,
    upstream: Arc<str>,
    armed: bool,
}

impl Bill {
    pub(super) fn new(leases: Leases, lease: Arc<Lease>, abandoned: Micros, upstream: Arc<str>) -> Bill {
        Bill { leases, lease, abandoned, upstream, armed: true }
    }

    /// What the call's slot holds (`max_cost_per_request`).
    pub fn held(&self) -> Micros {
        self.lease.unit
    }

    /// Records the call's cost; the flusher settles it.
    pub fn finish(mut self, cost: Micros) {
        self.armed = false;
        self.record(cost);
    }

    fn record(&self, cost: Micros) {
        let unit = self.lease.unit;
        let cost = if cost > unit {
            tracing::warn!(upstream = %self.upstream, %cost, held = %unit, "metered cost above max_cost_per_request; captured the slot");
            metrics::counter!(GATEWAY_COST_CAPPED, "upstream" => self.upstream.to_string()).increment(1);
            unit
        } else {
            cost
        };
        {
            let mut st = lock(&self.lease.state);
            st.in_flight = st.in_flight.saturating_sub(1);
            st.done.push(cost);
        }
        self.leases.enqueue(&self.lease);
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            tracing::debug!(upstream = %self.upstream, "gateway call abandoned; charging it");
            self.record(self.abandoned);
        }
    }
}
