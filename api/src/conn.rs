//! The API's Redis connection: one multiplexed connection shared by every request (concurrent
//! requests are pipelined on it), taken from the pool once and replaced after an error.
//!
//! Why not a pool checkout per request: bb8 validates every checkout with a PING, a second round
//! trip per cache hit. Sharing one validated connection keeps a hit at one round trip; dropping
//! it on the first error makes the next request check out (and validate) a fresh one, so a
//! restarted Redis is picked up again.

use std::sync::Mutex;

use topk::cache::{CacheError, Conn, Redis};

/// See the module documentation.
pub struct SharedConn {
    redis: Redis,
    current: Mutex<Option<Conn>>,
}

impl SharedConn {
    pub fn new(redis: Redis) -> Self {
        SharedConn {
            redis,
            current: Mutex::new(None),
        }
    }

    /// The pool behind it (readiness checks a fresh checkout).
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// The shared connection (a clone: same socket), checked out from the pool if there is none.
    pub async fn get(&self) -> Result<Conn, CacheError> {
        if let Some(conn) = self.current.lock().ok().and_then(|c| c.clone()) {
            return Ok(conn);
        }
        let conn = self.redis.get().await?;
        if let Ok(mut current) = self.current.lock() {
            *current = Some(conn.clone());
        }
        Ok(conn)
    }

    /// A call on the shared connection failed or timed out: the next request takes a new one.
    pub fn failed(&self) {
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }
}
