//! The control socket: a Unix stream socket speaking one JSON object per line in each
//! direction (docs/api.md). The messages are types ([`wire`]) that the server and the client
//! (`ferry ctl`) share, so a field renamed on one side is renamed on both.
//!
//! ```text
//! ferry ctl --client::call--> {"cmd":"pause"} --server::serve--> handle(Request) -> Answer
//!           <------------------ {"ok":true,"state":"paused"} <----------------
//! ```

pub mod client;
pub mod server;
pub mod wire;

pub use server::{ApiListener, ApiServer, Error, MAX_CONNECTIONS, MAX_REQUEST};
