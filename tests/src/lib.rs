//! Integration tests of shoal live in `tests/`; this library is empty.
