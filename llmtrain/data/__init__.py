"""Data: the embedded default task and data set, and loaders for user data."""
