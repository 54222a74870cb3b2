"""The endpoint: a daemon on a resource that runs tasks from the relay."""

from .agent import EndpointAgent

__all__ = ["EndpointAgent"]
