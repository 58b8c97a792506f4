//! tonic plumbing shared by fireflyer's services and clients.
//!
//! - [`ClientOptions`] and [`channel`]: every channel has a connect timeout and a per-request
//!   timeout, so no RPC can hang forever.
//! - [`LeaderHint`], [`not_leader`], [`leader_hint`]: the one convention by which a replica of a
//!   Raft-backed service tells a client where the leader is (status code `UNAVAILABLE` with
//!   `ff-leader-id` / `ff-leader-addr` metadata).
//! - [`with_token`], [`token_of`]: how a client's token travels (`authorization: Bearer ...`).
//! - [`tokens`]: making tokens, their stored hashes, the shared administrator's token file.
//! - [`LeaderClient`]: a client over a list of endpoints that follows leader hints, fails over on
//!   unreachable endpoints, and retries with bounded, jittered backoff until a deadline.

pub mod tokens;

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Metadata key carrying a client's token (`Bearer <token>`).
pub const TOKEN_KEY: &str = "authorization";

/// Attaches `token` to `request` (nothing when it is empty).
pub fn with_token<T>(mut request: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    if !token.is_empty()
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
    {
        request.metadata_mut().insert(TOKEN_KEY, value);
    }
    request
}

/// The token a request carries, if any.
pub fn token_of<T>(request: &tonic::Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(TOKEN_KEY)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Metadata key carrying the leader's node id in a not-leader status.
pub const LEADER_ID_KEY: &str = "ff-leader-id";
/// Metadata key carrying the leader's address in a not-leader status.
pub const LEADER_ADDR_KEY: &str = "ff-leader-addr";

/// Timeouts and retry bounds of a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time allowed to establish a TCP + HTTP/2 connection.
    pub connect_timeout: Duration,
    /// Time allowed for one RPC attempt.
    pub request_timeout: Duration,
    /// Time allowed for one call including all its retries.
    pub total_timeout: Duration,
    /// Most attempts one call makes.
    pub max_attempts: u32,
    /// First pause between attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            max_attempts: 64,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// Why a channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The address is not a valid `host:port` (or URI).
    #[error("invalid address {addr:?}: {message}")]
    InvalidAddress {
        /// The address given.
        addr: String,
        /// What is wrong with it.
        message: String,
    },
}

impl From<RpcError> for Status {
    fn from(error: RpcError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

/// A lazily connecting channel to `addr` (`host:port` or a full `http://` URI) with the
/// timeouts of `options`.
pub fn channel(addr: &str, options: &ClientOptions) -> Result<Channel, RpcError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| RpcError::InvalidAddress {
        addr: addr.to_string(),
        message: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .timeout(options.request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Where a replica believes the leader is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    /// The leader's node id.
    pub id: u64,
    /// The leader's client-facing address.
    pub addr: String,
}

/// A status telling the client this replica is not the leader, with a hint when one is known.
pub fn not_leader(message: impl Into<String>, hint: Option<&LeaderHint>) -> Status {
    let mut status = Status::unavailable(message);
    if let Some(hint) = hint {
        let metadata = status.metadata_mut();
        metadata.insert(LEADER_ID_KEY, MetadataValue::from(hint.id));
        if let Ok(addr) = MetadataValue::try_from(hint.addr.as_str()) {
            metadata.insert(LEADER_ADDR_KEY, addr);
        }
    }
    status
}

/// The leader hint carried by `status`, if any.
pub fn leader_hint(status: &Status) -> Option<LeaderHint> {
    let metadata = status.metadata();
    let id = metadata.get(LEADER_ID_KEY)?.to_str().ok()?.parse().ok()?;
    let addr = metadata.get(LEADER_ADDR_KEY)?.to_str().ok()?.to_string();
    Some(LeaderHint { id, addr })
}

/// Whether an attempt that failed with `status` may be retried.
///
/// `UNAVAILABLE` never reached the service's state machine (or is a not-leader answer) and is
/// always retried. A timed-out attempt may have taken effect, so it is retried only when the
/// caller says the operation is idempotent (Raft proposals with a request id are).
fn retryable(status: &Status, idempotent: bool) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => idempotent,
        _ => false,
    }
}

/// A client of a replicated service reachable at several endpoints.
///
/// Calls go to the endpoint believed to be the leader. A not-leader answer with a hint moves
/// the client to the hinted leader; an unreachable endpoint moves it to the next one. Every
/// attempt has the request timeout of its channel; the whole call has `total_timeout`.
#[derive(Debug)]
pub struct LeaderClient {
    options: ClientOptions,
    state: Mutex<ClientState>,
}

#[derive(Debug)]
struct ClientState {
    /// Known endpoints with their channels; never empty.
    endpoints: Vec<(String, Channel)>,
    current: usize,
}

impl LeaderClient {
    /// A client over `endpoints` (`host:port`); at least one is required.
    pub fn new(endpoints: Vec<String>, options: ClientOptions) -> Result<Self, RpcError> {
        if endpoints.is_empty() {
            return Err(RpcError::InvalidAddress {
                addr: String::new(),
                message: "no endpoints given".to_string(),
            });
        }
        let endpoints = endpoints
            .into_iter()
            .map(|addr| channel(&addr, &options).map(|ch| (addr, ch)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LeaderClient {
            options,
            state: Mutex::new(ClientState {
                endpoints,
                current: 0,
            }),
        })
    }

    /// The client's options.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The endpoint the next call goes to first.
    pub fn current_endpoint(&self) -> String {
        let state = self.lock();
        state.endpoints[state.current].0.clone()
    }

    /// The known endpoints (configured ones plus leaders learned from hints).
    pub fn endpoints(&self) -> Vec<String> {
        self.lock()
            .endpoints
            .iter()
            .map(|(addr, _)| addr.clone())
            .collect()
    }

    /// A channel to one specific endpoint, for calls that must not move (e.g. per-node status).
    pub fn channel_to(&self, addr: &str) -> Result<Channel, RpcError> {
        let state = self.lock();
        match state.endpoints.iter().find(|(known, _)| known == addr) {
            Some((_, existing)) => Ok(existing.clone()),
            None => channel(addr, &self.options),
        }
    }

    /// Runs `op` against the leader, retrying only failures that never took effect.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with(false, op).await
    }

    /// Runs an idempotent `op` against the leader, also retrying timed-out attempts.
    pub async fn call_idempotent<T, F, Fut>(&self, op: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with(true, op).await
    }

    async fn call_with<T, F, Fut>(&self, idempotent: bool, mut op: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.options.total_timeout;
        let mut backoff = self.options.initial_backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let (addr, channel) = self.pick();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = match tokio::time::timeout(remaining, op(channel)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer from {addr} within the call's total timeout of {:?}",
                    self.options.total_timeout
                ))),
            };
            let status = match outcome {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if !retryable(&status, idempotent)
                || attempt >= self.options.max_attempts
                || Instant::now() + backoff >= deadline
            {
                return Err(status);
            }
            match leader_hint(&status) {
                Some(hint) if hint.addr != addr => {
                    tracing::debug!(from = %addr, to = %hint.addr, "following leader hint");
                    self.move_to(&hint.addr);
                    // A fresh hint is worth trying at once.
                    continue;
                }
                _ => {
                    tracing::debug!(%addr, code = ?status.code(), message = status.message(), "endpoint failed; trying the next");
                    self.advance_from(&addr);
                }
            }
            let jitter = rand::random_range(0.5..1.0);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClientState> {
        // The state is a plain index and map; a panic elsewhere cannot leave it inconsistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pick(&self) -> (String, Channel) {
        let state = self.lock();
        state.endpoints[state.current].clone()
    }

    fn move_to(&self, addr: &str) {
        let mut state = self.lock();
        if let Some(index) = state.endpoints.iter().position(|(known, _)| known == addr) {
            state.current = index;
            return;
        }
        match channel(addr, &self.options) {
            Ok(new) => {
                state.endpoints.push((addr.to_string(), new));
                state.current = state.endpoints.len() - 1;
            }
            Err(error) => tracing::warn!(%error, "ignoring unusable leader hint"),
        }
    }

    fn advance_from(&self, failed: &str) {
        let mut state = self.lock();
        // Another task may already have moved on; only advance if we still point at `failed`.
        if state.endpoints[state.current].0 == failed {
            state.current = (state.current + 1) % state.endpoints.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_hint_round_trips_through_status_metadata() {
        let hint = LeaderHint {
            id: 3,
            addr: "10.0.0.3:7000".to_string(),
        };
        let status = not_leader("node 1 is a follower", Some(&hint));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(leader_hint(&status), Some(hint));
        assert_eq!(leader_hint(&not_leader("no leader", None)), None);
        assert_eq!(leader_hint(&Status::internal("x")), None);
    }

    #[test]
    fn tokens_travel_in_metadata() {
        let request = with_token(tonic::Request::new(()), "s3cret");
        assert_eq!(token_of(&request), Some("s3cret"));
        assert_eq!(token_of(&with_token(tonic::Request::new(()), "")), None);
    }

    #[test]
    fn only_safe_failures_are_retried() {
        assert!(retryable(&Status::unavailable("down"), false));
        assert!(!retryable(&Status::cancelled("Timeout expired"), false));
        assert!(retryable(&Status::cancelled("Timeout expired"), true));
        assert!(!retryable(&Status::invalid_argument("bad"), true));
    }

    #[test]
    fn bad_addresses_are_rejected() {
        assert!(LeaderClient::new(vec![], ClientOptions::default()).is_err());
        assert!(channel("not a uri\n", &ClientOptions::default()).is_err());
    }

    #[tokio::test]
    async fn unreachable_endpoints_fail_over_and_give_up_in_time() {
        // Two ports with nothing listening: every attempt is UNAVAILABLE.
        let dead: Vec<String> = (0..2)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            })
            .collect();
        let options = ClientOptions {
            total_timeout: Duration::from_millis(600),
            connect_timeout: Duration::from_millis(100),
            ..ClientOptions::default()
        };
        let client = LeaderClient::new(dead.clone(), options).unwrap();
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let result: Result<(), Status> = client
            .call(|channel| {
                let attempts = attempts.clone();
                async move {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut grpc = tonic::client::Grpc::new(channel);
                    grpc.ready()
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    let codec = tonic_prost::ProstCodec::<(), ()>::default();
                    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/t.T/Call");
                    grpc.unary(tonic::Request::new(()), path, codec).await
                }
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(3));
        // It failed over between the endpoints rather than giving up after one.
        assert!(attempts.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        assert!(dead.contains(&client.current_endpoint()));
    }
}
