"""Model: the user's blocking model behind a small interface, run in worker threads."""
