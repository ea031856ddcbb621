//! memvisor-asi (under construction in this session).
