//! VIP listeners.
