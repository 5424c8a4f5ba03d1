//! What the VM as a whole must react to: sent by vCPU threads and devices, taken by whoever
//! runs the VM (the `ferry` main loop). A module of its own so that devices and vCPU threads
//! both name it without importing each other.

/// Something the VM as a whole must react to, sent by vCPU threads and devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked to reset the machine (ferry treats it as a clean stop).
    Reset { source: &'static str },
    /// The guest powered the machine off.
    Poweroff,
    /// Someone asked ferry to end the VM (control socket `stop`, a signal).
    StopRequested { by: &'static str },
    /// A vCPU hit something it cannot continue from.
    GuestFailure { vcpu: u32, reason: String, rip: u64 },
}
