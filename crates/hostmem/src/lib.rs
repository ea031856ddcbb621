//! memvisor-hostmem (under construction in this session).
