//! What keeps a cell and the router within bounds, one module each: token-bucket rate
//! limits (`rate`), the retry budget (`budget`), the per-cell concurrency breaker
//! (`breaker`) and holds while a cell is frozen or held (`hold`). Each takes its clock
//! from tokio, so its unit tests run on a paused clock.

pub mod breaker;
pub mod budget;
pub mod hold;
pub mod rate;
