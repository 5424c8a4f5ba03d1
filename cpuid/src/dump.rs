//! Parsers for CPUID dumps (filled in by the dump-parser work).
