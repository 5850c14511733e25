//! TODO: flow (being written).
