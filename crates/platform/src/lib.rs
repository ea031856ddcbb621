//! The reference VMM's platform devices and loader (in progress).

#![forbid(unsafe_code)]
#![warn(missing_docs)]
