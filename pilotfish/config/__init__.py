"""The typed config model every sidecar stage reads, and the loaders that fill it."""

from pilotfish.config.errors import ConfigError
from pilotfish.config.model import (
    AdminConfig,
    Bootstrap,
    ClusterConfig,
    Endpoint,
    HeaderMatcher,
    HeaderMutation,
    ListenerConfig,
    PathMatch,
    Protocol,
    RouteAction,
    RouteConfig,
    RouteEntry,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)

__all__ = [
    "AdminConfig",
    "Bootstrap",
    "ClusterConfig",
    "ConfigError",
    "Endpoint",
    "HeaderMatcher",
    "HeaderMutation",
    "ListenerConfig",
    "PathMatch",
    "Protocol",
    "RouteAction",
    "RouteConfig",
    "RouteEntry",
    "RouteMatch",
    "VirtualHost",
    "WeightedCluster",
]
