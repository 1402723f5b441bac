"""The test world: real PostgreSQL, Redis, Docker and a BookGen host tree (QUALITY.md)."""
