//! A bounds-checked little-endian codec: [`Encoder`] appends to a `Vec<u8>`, [`Decoder`]
//! reads from a byte slice.
//!
//! ```text
//! Encoder: u8 u16 u32 u64 | raw bytes | u32/u64 length + bytes (length checked against a cap)
//! Decoder: the same reads, each one bounds-checked; errors name the field and its offset
//! ```
//!
//! Invariants of the decoder, which reads what a peer or a file hands it:
//! - every read checks the remaining input first and returns [`Error`], never panics;
//! - a length or count read from the input is checked against the caller's cap AND against
//!   the remaining input BEFORE anything is allocated, so no allocation is larger than the
//!   cap or the input;
//! - offsets in errors are absolute: a decoder made with [`Decoder::with_base`] over one
//!   section's payload reports offsets in the whole stream.
//!
//! The encoder refuses (with the same [`Error::TooLarge`]) to write a length the decoder
//! would refuse, so a writer never produces what a reader rejects.
//!
//! The state records inside section payloads are encoded by crate::records with it.

/// A codec error: what was being read or written, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input ends before the field does.
    #[error("truncated {what} at offset {offset}: needs {need} bytes, {left} left")]
    Truncated {
        what: &'static str,
        offset: u64,
        need: u64,
        left: u64,
    },
    /// A length or count exceeds the cap for that field.
    #[error("{what} at offset {offset}: length {len} exceeds the cap {cap}")]
    TooLarge {
        what: &'static str,
        offset: u64,
        len: u64,
        cap: u64,
    },
    /// A string field is not UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    NotUtf8 { what: &'static str, offset: u64 },
    /// A field holds a value it may not (a flag that is not 0 or 1, an unknown kind).
    /// A MEMI image's extent that breaks its rules.
    #[error("MEMI extent at offset {offset}: offset {start:#x} length {len:#x}: extents must be nonzero, page aligned, at most 64 MiB, ascending and inside the image")]
    BadExtent { offset: u64, start: u64, len: u64 },
    #[error("{what} at offset {offset}: {value} is not {allowed}")]
    Invalid {
        what: &'static str,
        offset: u64,
        value: u64,
        allowed: &'static str,
    },
    /// Bytes are left over after the last field of a record.
    #[error("{left} unread bytes after {what} at offset {offset}")]
    Trailing {
        what: &'static str,
        offset: u64,
        left: u64,
    },
}

/// Appends little-endian values to a byte vector.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// The number of bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes written.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Raw bytes with no length (a fixed-size field).
    pub fn bytes(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// A count or length as u32, refused when it exceeds `cap`.
    pub fn count_u32(&mut self, what: &'static str, n: usize, cap: u32) -> Result<(), Error> {
        match u32::try_from(n) {
            Ok(v) if v <= cap => {
                self.u32(v);
                Ok(())
            }
            _ => Err(self.too_large(what, n, u64::from(cap))),
        }
    }

    /// A u32 length then the bytes; refused when longer than `cap`.
    pub fn bytes_u32(&mut self, what: &'static str, data: &[u8], cap: u32) -> Result<(), Error> {
        self.count_u32(what, data.len(), cap)?;
        self.bytes(data);
        Ok(())
    }

    /// A u64 length then the bytes; refused when longer than `cap`.
    pub fn bytes_u64(&mut self, what: &'static str, data: &[u8], cap: u64) -> Result<(), Error> {
        match u64::try_from(data.len()) {
            Ok(v) if v <= cap => {
                self.u64(v);
                self.bytes(data);
                Ok(())
            }
            _ => Err(self.too_large(what, data.len(), cap)),
        }
    }

    /// A UTF-8 string as [`Encoder::bytes_u32`].
    pub fn str_u32(&mut self, what: &'static str, s: &str, cap: u32) -> Result<(), Error> {
        self.bytes_u32(what, s.as_bytes(), cap)
    }

    fn too_large(&self, what: &'static str, n: usize, cap: u64) -> Error {
        Error::TooLarge {
            what,
            offset: self.buf.len() as u64,
            len: n as u64,
            cap,
        }
    }
}

/// Reads little-endian values from a byte slice, every read bounds-checked.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Decoder<'a> {
    /// A decoder over `buf`; offsets in errors count from its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Self::with_base(buf, 0)
    }

    /// A decoder over `buf`, which begins at offset `base` of a larger stream; offsets in
    /// errors are `base` + the position in `buf`.
    pub fn with_base(buf: &'a [u8], base: u64) -> Self {
        Self { buf, pos: 0, base }
    }

    /// The absolute offset of the next byte to read.
    pub fn offset(&self) -> u64 {
        self.base.saturating_add(self.pos as u64)
    }

    /// The number of bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Ok when every byte has been read; [`Error::Trailing`] naming `what` otherwise.
    pub fn finish(&self, what: &'static str) -> Result<(), Error> {
        match self.remaining() {
            0 => Ok(()),
            left => Err(Error::Trailing {
                what,
                offset: self.offset(),
                left: left as u64,
            }),
        }
    }

    /// The next `n` bytes, borrowed.
    pub fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], Error> {
        let left = self.remaining();
        if n > left {
            return Err(Error::Truncated {
                what,
                offset: self.offset(),
                need: n as u64,
                left: left as u64,
            });
        }
        let start = self.pos;
        self.pos += n;
        self.buf.get(start..self.pos).ok_or(Error::Truncated {
            what,
            offset: self.base.saturating_add(start as u64),
            need: n as u64,
            left: left as u64,
        })
    }

    /// A fixed-size byte array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A u32 count of entries each at least `min_size` bytes long, checked against `cap`
    /// and against the remaining input (`count * min_size` bytes must be left) before the
    /// caller allocates for it.
    pub fn count_u32(
        &mut self,
        what: &'static str,
        cap: u32,
        min_size: usize,
    ) -> Result<usize, Error> {
        let offset = self.offset();
        let n = self.u32(what)?;
        self.check_len(what, offset, u64::from(n), u64::from(cap), min_size as u64)
    }

    /// A u32 length then that many bytes, copied; the length is checked against `cap` and
    /// the remaining input before allocating.
    pub fn bytes_u32(&mut self, what: &'static str, cap: u32) -> Result<Vec<u8>, Error> {
        let offset = self.offset();
        let n = self.u32(what)?;
        let n = self.check_len(what, offset, u64::from(n), u64::from(cap), 1)?;
        Ok(self.take(what, n)?.to_vec())
    }

    /// A u64 length then that many bytes, copied; checked as [`Decoder::bytes_u32`].
    pub fn bytes_u64(&mut self, what: &'static str, cap: u64) -> Result<Vec<u8>, Error> {
        Ok(self.slice_u64(what, cap)?.to_vec())
    }

    /// A u64 length then that many bytes, borrowed from the input.
    pub fn slice_u64(&mut self, what: &'static str, cap: u64) -> Result<&'a [u8], Error> {
        let offset = self.offset();
        let n = self.u64(what)?;
        let n = self.check_len(what, offset, n, cap, 1)?;
        self.take(what, n)
    }

    /// A u32 length then that many bytes of UTF-8.
    pub fn str_u32(&mut self, what: &'static str, cap: u32) -> Result<String, Error> {
        let offset = self.offset();
        let bytes = self.bytes_u32(what, cap)?;
        String::from_utf8(bytes).map_err(|_| Error::NotUtf8 { what, offset })
    }

    /// Checks a decoded length `n` (of entries at least `min_size` bytes each) against
    /// `cap` and against the remaining input; returns it as usize.
    fn check_len(
        &self,
        what: &'static str,
        offset: u64,
        n: u64,
        cap: u64,
        min_size: u64,
    ) -> Result<usize, Error> {
        if n > cap {
            return Err(Error::TooLarge {
                what,
                offset,
                len: n,
                cap,
            });
        }
        let left = self.remaining() as u64;
        let need = n.saturating_mul(min_size);
        if need > left {
            return Err(Error::Truncated {
                what,
                offset: self.offset(),
                need,
                left,
            });
        }
        usize::try_from(n).map_err(|_| Error::TooLarge {
            what,
            offset,
            len: n,
            cap: usize::MAX as u64,
        })
    }
}

// ----------------------------------------------------------------------------------------
