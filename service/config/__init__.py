"""Settings from BRIDGE_* environment variables, and the secrets they point at."""
