"""Training objectives: small pure functions that return a dict of loss terms."""
