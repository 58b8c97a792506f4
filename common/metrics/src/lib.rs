//! Metrics plumbing shared by every fireflyer daemon.
//!
//! Each daemon owns one [`prometheus::Registry`] (never the process-global default, so several
//! daemons can live in one test process without their series colliding) and serves it as text
//! at `GET /metrics` with [`MetricsServer`]. `GET /healthz` answers `ok` for liveness probes.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use prometheus;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listen address could not be bound.
    #[error("cannot listen for /metrics on {addr}: {cause}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// A metric could not be registered (usually a duplicate name).
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// A running `/metrics` HTTP endpoint. Dropping it stops the server.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free one) and serves `registry` on it.
    pub async fn start(addr: &str, registry: Registry) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind {
                addr: addr.to_string(),
                cause: source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| MetricsError::Bind {
            addr: addr.to_string(),
            cause: source,
        })?;
        let app = Router::new()
            .route("/metrics", get(render))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(registry);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::warn!(%error, "metrics endpoint stopped");
            }
        });
        Ok(MetricsServer {
            local_addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the endpoint and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn render(State(registry): State<Registry>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            format!("cannot encode metrics: {error}\n").into_bytes(),
        ),
    }
}

/// Renders `registry` in the Prometheus text format (what `/metrics` serves).
pub fn render_text(registry: &Registry) -> String {
    let mut body = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    if TextEncoder::new()
        .encode(&registry.gather(), &mut body)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of the series written exactly `series` (name and labels, as the exposition
/// format prints them) in a `/metrics` text, if it is there.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Fetches `path` from an HTTP endpoint such as a daemon's `/metrics` (status line, headers
/// and body), with a five-second timeout on connecting and on reading: what demos, benchmarks
/// and tests use to scrape daemons without a full HTTP client.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = std::time::Duration::from_secs(5);
    let timed_out = |what| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
    let mut stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("connect timed out"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(timeout, stream.read_to_string(&mut response))
        .await
        .map_err(|_| timed_out("read timed out"))??;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_found_by_its_exact_name_and_labels() {
        let text = "# HELP x_total X\nx_total_more 9\nx_total{op=\"a\"} 2\nx_total 7\n";
        assert_eq!(series_value(text, "x_total"), Some(7.0));
        assert_eq!(series_value(text, "x_total{op=\"a\"}"), Some(2.0));
        assert_eq!(series_value(text, "x_total{op=\"b\"}"), None);
        assert_eq!(series_value(text, "y"), None);
    }

    #[tokio::test]
    async fn serves_the_registry_it_was_given() {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("test_things_total", "things").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(3);

        let server = MetricsServer::start("127.0.0.1:0", registry.clone())
            .await
            .unwrap();
        let body = http_get(&server.local_addr().to_string(), "/metrics")
            .await
            .unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("test_things_total 3"), "{body}");
        assert!(
            http_get(&server.local_addr().to_string(), "/healthz")
                .await
                .unwrap()
                .contains("ok")
        );
        assert!(render_text(&registry).contains("test_things_total 3"));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap().to_string();
        let err = MetricsServer::start(&addr, Registry::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&addr), "{err}");
    }
}

/// Registers `{component}_build_info{version}` = 1: which build of which component answers, for
/// dashboards and for alerts on mixed versions during an upgrade.
pub fn register_build_info(registry: &Registry, component: &str) -> Result<(), prometheus::Error> {
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            format!("{component}_build_info"),
            format!("Build of this {component} (always 1; the version is a label)"),
        ),
        &["version"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(info))
}

/// The request series every service exports: `{prefix}_requests_total{op,outcome}` and
/// `{prefix}_request_seconds{op}`, with the known operations' series present from the start
/// (so that dashboards and alerts see zeros, not gaps).
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    requests: prometheus::IntCounterVec,
    seconds: prometheus::HistogramVec,
}

impl RequestMetrics {
    /// Registers the series of the service `what` under `prefix` in `registry`.
    pub fn register(
        registry: &Registry,
        prefix: &str,
        what: &str,
        ops: &[&str],
    ) -> Result<RequestMetrics, prometheus::Error> {
        let requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                format!("{prefix}_requests_total"),
                format!("{what} requests, by operation and outcome"),
            ),
            &["op", "outcome"],
        )?;
        let seconds = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                format!("{prefix}_request_seconds"),
                format!("Time to serve a {what} request, by operation"),
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18)?),
            &["op"],
        )?;
        for op in ops {
            for outcome in ["ok", "error"] {
                requests.with_label_values(&[op, outcome]);
            }
            seconds.with_label_values(&[op]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(RequestMetrics { requests, seconds })
    }

    /// Counts one request of `op` that started at `started`.
    pub fn observe(&self, op: &str, started: std::time::Instant, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.requests.with_label_values(&[op, outcome]).inc();
        self.seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Runs `request` as one request of `op`, counting and timing it.
    pub async fn timed<T, E>(
        &self,
        op: &str,
        request: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = std::time::Instant::now();
        let result = request.await;
        self.observe(op, started, result.is_ok());
        result
    }
}
