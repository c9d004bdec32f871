"""phenoscale package."""
