"""registry-trio: an OCI registry on Trio with crash-safe, enriched event notifications."""

__version__ = "0.1.0"
