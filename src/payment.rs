//! TODO: payment (being written).
