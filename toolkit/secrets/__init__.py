"""Secrets on the host: the .env file, rotation."""
