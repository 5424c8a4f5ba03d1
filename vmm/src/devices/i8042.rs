//! The i8042 keyboard controller, just enough of it for the guest to reset the machine
//! (command 0xFE on port 0x64), which Linux does on `reboot` with `reboot=k`: ferry then
//! ends the VM as a clean guest-requested stop.

use std::sync::mpsc::Sender;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::event::VmEvent;

/// The controller's data port; its command/status port is 4 above.
pub const I8042_BASE: u64 = 0x60;

/// Turns the controller's reset line into a [`VmEvent::Reset`].
#[derive(Debug)]
pub struct ResetTrigger(pub Sender<VmEvent>);

impl Trigger for ResetTrigger {
    type E = std::sync::mpsc::SendError<VmEvent>;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(VmEvent::Reset {
            source: "i8042 reset (port 0x64, 0xfe)",
        })
    }
}

/// The controller on ports 0x60-0x64.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042(I8042Device::new(ResetTrigger(events)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if self.0.write(offset as u8, *b).is_err() {
                log::debug!("i8042 reset while the VM is going away");
            }
        }
    }
}
