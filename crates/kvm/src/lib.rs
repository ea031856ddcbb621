//! memvisor-kvm (under construction in this session).
