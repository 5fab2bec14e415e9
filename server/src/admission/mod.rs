//! Who gets in, and how much: the enrollment CA and mutual TLS (`pki`), and
//! the limits that keep one client or a flood of strangers from starving
//! the rest (`limits`). This is the first thing a device's bytes meet.

pub mod limits;
pub mod pki;
