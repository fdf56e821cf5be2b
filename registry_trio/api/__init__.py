"""The HTTP API: OCI Distribution routes, where events are built from request and actor."""

from .app import RegistryApp, create_app
from .context import Registry

__all__ = ["Registry", "RegistryApp", "create_app"]
