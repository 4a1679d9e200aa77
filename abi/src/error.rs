//! Hypercall error codes.
//!
//! A failed hypercall stores `-(code)` in [`crate::HypercallHeader::ret`];
//! success stores a value `>= 0`.

/// Why a hypercall failed. The discriminant is the wire code.
#[repr(i64)]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HypercallError {
    /// The hypercall number is not known to this host.
    UnknownHypercall = 1,
    /// `arg_len` does not match the size of this call's argument type.
    BadLength = 2,
    /// A pointer argument (with its length) is not inside guest RAM.
    Fault = 3,
    /// An argument has a value the call does not accept.
    Invalid = 4,
    /// A per-guest limit was reached (for example the console byte budget).
    LimitExceeded = 5,
    /// The header's reserved field is not zero.
    ReservedNotZero = 6,
    /// The guest may not do this: a frame it does not own, an address in
    /// a host-reserved area.
    Denied = 7,
}

impl HypercallError {
    /// The value stored in `ret` for this error.
    pub const fn to_ret(self) -> i64 {
        -(self as i64)
    }

    /// Decodes a negative `ret` value; `None` for success or an unknown code.
    pub const fn from_ret(ret: i64) -> Option<Self> {
        Some(match ret {
            -1 => Self::UnknownHypercall,
            -2 => Self::BadLength,
            -3 => Self::Fault,
            -4 => Self::Invalid,
            -5 => Self::LimitExceeded,
            -6 => Self::ReservedNotZero,
            -7 => Self::Denied,
            _ => return None,
        })
    }

    /// A short description.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownHypercall => "unknown hypercall number",
            Self::BadLength => "argument length does not match the call",
            Self::Fault => "pointer argument outside guest memory",
            Self::Invalid => "invalid argument value",
            Self::LimitExceeded => "guest limit exceeded",
            Self::ReservedNotZero => "reserved header field is not zero",
            Self::Denied => "not the guest's to use",
        }
    }
}

#[cfg(feature = "std")]
impl core::fmt::Display for HypercallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

// `core::error::Error`, so that enabling the feature never links `std`
// into a guest that shares a build with the host.
#[cfg(feature = "std")]
impl core::error::Error for HypercallError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_through_ret() {
        for e in [
            HypercallError::UnknownHypercall,
            HypercallError::BadLength,
            HypercallError::Fault,
            HypercallError::Invalid,
            HypercallError::LimitExceeded,
            HypercallError::ReservedNotZero,
            HypercallError::Denied,
        ] {
            assert!(e.to_ret() < 0);
            assert_eq!(HypercallError::from_ret(e.to_ret()), Some(e));
        }
        assert_eq!(HypercallError::from_ret(0), None);
        assert_eq!(HypercallError::from_ret(-999), None);
    }
}
