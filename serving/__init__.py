"""Serving: publishing to a TF Serving model repository, a TF Serving-compatible server, and the client."""
