//! COM1: a 16550A UART (vm-superio) whose interrupt line is an eventfd wired to the
//! in-kernel irqchip (irqfd, GSI 4). Output goes to any writer (stdout for `ferry run`).

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1's first port.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises an interrupt by writing to an eventfd that KVM turns into an IRQ.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that flushes after every write, so console lines appear as the guest prints.
#[derive(Debug)]
pub struct FlushingWriter<W: Write>(pub W);

impl<W: Write> Write for FlushingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A console writer shared between the live UART and one rebuilt from a saved state.
#[derive(Clone)]
pub struct SharedWriter(std::sync::Arc<std::sync::Mutex<Box<dyn Write + Send>>>);

impl std::fmt::Debug for SharedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedWriter")
    }
}

impl SharedWriter {
    /// `w`, to share.
    pub fn new(w: Box<dyn Write + Send>) -> SharedWriter {
        SharedWriter(std::sync::Arc::new(std::sync::Mutex::new(w)))
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// The console UART.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SharedWriter>,
    irq: EventFd,
    out: SharedWriter,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let out = SharedWriter(std::sync::Arc::new(std::sync::Mutex::new(out)));
        let uart = Serial::new(IrqTrigger(irq.try_clone()?), out.clone());
        Ok(SerialDevice { uart, irq, out })
    }

    /// The UART's registers and unread input.
    pub fn registers(&self) -> migration::SerialState {
        let s = self.uart.state();
        migration::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Replaces the UART's registers and input with a saved state.
    pub fn load_registers(
        &mut self,
        s: &migration::SerialState,
    ) -> Result<(), vm_superio::serial::Error<std::io::Error>> {
        let state = vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = self
            .irq
            .try_clone()
            .map_err(vm_superio::serial::Error::IOError)?;
        let out = self.out.clone();
        self.uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)?;
        Ok(())
    }

    /// Queues bytes for the guest to read (console input). Returns how many fit.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or_else(|e| {
            log::warn!("serial input dropped: {e:?}");
            0
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                log::warn!("serial output failed: {e:?}");
            }
        }
    }
}
