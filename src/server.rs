//! TODO: server (being written).
