//! TODO: merchant (being written).
