"""The Docker engine through the docker SDK, always with timeouts."""
