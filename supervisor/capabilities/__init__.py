"""Capability providers the daemon registers with the broker (kv, http)."""

from .http import HttpCapability
from .kv import KVCapability

__all__ = ["HttpCapability", "KVCapability"]
