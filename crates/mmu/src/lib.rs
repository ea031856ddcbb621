//! memvisor-mmu (under construction in this session).
