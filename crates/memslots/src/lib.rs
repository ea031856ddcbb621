//! memvisor-memslots (under construction in this session).
