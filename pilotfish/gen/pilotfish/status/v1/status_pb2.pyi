import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListProxiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProxiesResponse(_message.Message):
    __slots__ = ("proxies", "mesh_generation", "mesh_error", "proxyless_ignored")
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    MESH_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MESH_ERROR_FIELD_NUMBER: _ClassVar[int]
    PROXYLESS_IGNORED_FIELD_NUMBER: _ClassVar[int]
    proxies: _containers.RepeatedCompositeFieldContainer[ProxyStatus]
    mesh_generation: int
    mesh_error: str
    proxyless_ignored: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, proxies: _Optional[_Iterable[_Union[ProxyStatus, _Mapping]]] = ..., mesh_generation: _Optional[int] = ..., mesh_error: _Optional[str] = ..., proxyless_ignored: _Optional[_Iterable[str]] = ...) -> None: ...

class ProxyStatus(_message.Message):
    __slots__ = ("node_id", "service", "namespace", "stream_kind", "connected_since", "resources", "in_sync", "admin_address", "spiffe_id", "certificate_expires")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    STREAM_KIND_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    service: str
    namespace: str
    stream_kind: str
    connected_since: _timestamp_pb2.Timestamp
    resources: _containers.RepeatedCompositeFieldContainer[ResourceTypeStatus]
    in_sync: bool
    admin_address: str
    spiffe_id: str
    certificate_expires: _timestamp_pb2.Timestamp
    def __init__(self, node_id: _Optional[str] = ..., service: _Optional[str] = ..., namespace: _Optional[str] = ..., stream_kind: _Optional[str] = ..., connected_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resources: _Optional[_Iterable[_Union[ResourceTypeStatus, _Mapping]]] = ..., in_sync: _Optional[bool] = ..., admin_address: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., certificate_expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ResourceTypeStatus(_message.Message):
    __slots__ = ("type_url", "acked_version", "sent_version", "last_nack_version", "last_nack_message", "in_sync", "current_version", "added", "removed", "changed")
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    ACKED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    type_url: str
    acked_version: str
    sent_version: str
    last_nack_version: str
    last_nack_message: str
    in_sync: bool
    current_version: str
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, type_url: _Optional[str] = ..., acked_version: _Optional[str] = ..., sent_version: _Optional[str] = ..., last_nack_version: _Optional[str] = ..., last_nack_message: _Optional[str] = ..., in_sync: _Optional[bool] = ..., current_version: _Optional[str] = ..., added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ...) -> None: ...
