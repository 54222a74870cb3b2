"""The relay: authenticates, records and forwards tasks between clients and endpoints."""

from .server import Relay

__all__ = ["Relay"]
