//! The feature catalogue (filled in by the catalogue work).
