//! # passerelle-http
//!
//! What every passerelle process needs around HTTP, so that the gateway and the services
//! behave alike:
//!
//! - [`server`]: the accept loop with connection limits, the front door's limits and
//!   deadlines, HTTP/2, and graceful shutdown;
//! - [`tls`]: TLS termination with a certificate reloaded without a restart;
//! - [`shutdown`]: turning a signal or a test trigger into a cancellation token;
//! - [`problem`]: `application/problem+json` errors, the only error shape on the wire;
//! - [`ops`]: `/health`, `/ready`, `/metrics`;
//! - [`metrics`]: the process-wide Prometheus recorder;
//! - [`observe`]: request ids, request metrics and access logs for every request;
//! - [`request_id`]: `X-Request-Id` handling;
//! - [`telemetry`]: structured logs.

mod conn;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod problem;
pub mod request_id;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use problem::Problem;
pub use server::{ServeOptions, serve};
pub use tls::{Tls, TlsError};
