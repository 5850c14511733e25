//! TODO: proxy (being written).
