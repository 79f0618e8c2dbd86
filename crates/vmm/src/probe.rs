//! Platform probes (todo).
