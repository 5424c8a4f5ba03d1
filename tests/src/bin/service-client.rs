//! A client of the test guest's network service, run inside a test's network namespace
//! (`ip netns exec NS service-client ...`):
//!
//!   service-client ADDR requests FIRST COUNT   REQ FIRST .. FIRST+COUNT-1, one at a time;
//!                                              prints "ACK n seq" for each
//!   service-client ADDR ping COUNT             prints "rtt_us X" for each PING
//!   service-client ADDR stream FIRST STOPFILE  REQ FIRST, FIRST+1, ... back to back on one
//!                                              connection until STOPFILE exists; prints
//!                                              how many were answered and the gaps
//!                                              (over 100 ms, or over GAP_MS if given:
//!                                              stream FIRST STOPFILE GAP_MS)
//!   service-client ADDR probe INTERVAL_US STOPFILE
//!                                              UDP probes to the service's echo every
//!                                              INTERVAL_US until STOPFILE exists; prints
//!                                              how many came back and each lost run
//!   service-client ADDR sink|source BYTES      prints "seconds X" for the transfer
//!   service-client ADDR diskw|diskr MB         prints "seconds X" for the guest's disk I/O
//!
//! Any answer that is not the expected one ends it with one error line and status 1.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match ferry_tests::service::client_command(&args) {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => {
            eprintln!("service-client: error: {e}");
            std::process::exit(1);
        }
    }
}
