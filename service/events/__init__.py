"""Events: what a session tells its clients, and the per-session log they are kept in."""
