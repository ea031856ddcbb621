//! memvisor-ioas (under construction in this session).
