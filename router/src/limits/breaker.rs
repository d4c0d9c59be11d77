//! The per-cell circuit breaker: a cell already holding its maximum of requests in flight
//! (`limits.maxInFlightPerCell`) fails the next one fast with 503, instead of queueing it
//! behind a slow cell while the client's timeout runs out. It trips and resets with the
//! load itself: no timer, so nothing to wait out once the cell answers again.

use crate::endpoints::EndpointState;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Whether the cell with these endpoints may take one more request.
pub fn admits(cell: &[Arc<EndpointState>], max_in_flight: u32) -> bool {
    let in_flight: u32 = cell
        .iter()
        .map(|e| e.in_flight.load(Ordering::Relaxed))
        .sum();
    in_flight < max_in_flight
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{EjectionPolicy, Endpoints};

    #[test]
    fn trips_at_the_limit_across_endpoints_and_resets_as_requests_end() {
        let e = Endpoints::new(EjectionPolicy::default());
        let cell: Vec<_> = ["10.0.0.1:80", "10.0.0.2:80"]
            .iter()
            .map(|a| e.state(a))
            .collect();
        let mut in_flight = Vec::new();
        for _ in 0..3 {
            assert!(admits(&cell, 3));
            in_flight.push(e.choose(&cell, None).unwrap().1);
        }
        assert!(!admits(&cell, 3), "three in flight over two endpoints");
        in_flight.pop();
        assert!(admits(&cell, 3), "one ended: room again");
        assert!(!admits(&cell, 0), "a limit of zero admits nothing");
    }
}
