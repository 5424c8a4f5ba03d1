//! Network namespaces for tests that need taps: each test makes its own (root, as CI runs),
//! with its taps and bridges, and talks only to addresses inside it; dropped, it is deleted.

use std::process::Command;

/// A network namespace of this test process.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (install iproute2)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A new namespace named after `tag` and this process, with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("ferry-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A tap `name` in the namespace (down: ferry opens it as it is).
    pub fn tap(&self, name: &str) {
        ip(&["-n", &self.name, "tuntap", "add", name, "mode", "tap"]);
    }

    /// A tap `name` with `addr` (like 10.0.0.1/24), up.
    pub fn tap_with_address(&self, name: &str, addr: &str) {
        self.tap(name);
        ip(&["-n", &self.name, "addr", "add", addr, "dev", name]);
        ip(&["-n", &self.name, "link", "set", name, "up"]);
    }

    /// A bridge `name` with `addr` (like 10.0.0.1/24), up: the host side of a network that
    /// taps join with [`Netns::tap_on_bridge`].
    pub fn bridge(&self, name: &str, addr: &str) {
        ip(&["-n", &self.name, "link", "add", name, "type", "bridge"]);
        ip(&["-n", &self.name, "addr", "add", addr, "dev", name]);
        ip(&["-n", &self.name, "link", "set", name, "up"]);
    }

    /// A tap `name` on `bridge`, up (its carrier comes once a ferry opens it).
    pub fn tap_on_bridge(&self, name: &str, bridge: &str) {
        self.tap(name);
        ip(&["-n", &self.name, "link", "set", name, "master", bridge]);
        ip(&["-n", &self.name, "link", "set", name, "up"]);
    }

    /// `program args` run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
