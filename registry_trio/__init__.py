"""registry-trio: an OCI registry on Trio with crash-safe, enriched event notifications.

Its version is the installed distribution's (``registry-trio --version``), kept in one place:
pyproject.toml.
"""
