//! The control socket: Cloud Hypervisor's REST API (HTTP/1.1 on a Unix socket, JSON bodies)
//! and ferry's own routes beside it (docs/api.md, docs/openapi.json). The messages are types
//! ([`wire`]) that the server and the client (`ferry ctl`) share, as are the routes
//! ([`routes`]), so a field or route renamed on one side is renamed on both.
//!
//! ```text
//! ferry ctl --client::call--> PUT /api/v1/vm.pause --server::serve--> routes::route -> Request
//!           <---------------- 204 <--- routes::respond(Answer) <--- handlers::handle(Request)
//! ```

pub mod client;
pub mod create;
pub mod handlers;
pub mod http;
pub mod routes;
pub mod server;
pub mod setup;
pub mod views;
pub mod wire;

pub use server::{ApiListener, ApiServer, Error, MAX_CONNECTIONS, MAX_REQUEST};
