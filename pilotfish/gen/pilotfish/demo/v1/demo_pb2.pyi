from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("message", "served_by", "quote_served_by")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    QUOTE_SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    message: str
    served_by: str
    quote_served_by: str
    def __init__(self, message: _Optional[str] = ..., served_by: _Optional[str] = ..., quote_served_by: _Optional[str] = ...) -> None: ...

class QuoteRequest(_message.Message):
    __slots__ = ("topic",)
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    topic: str
    def __init__(self, topic: _Optional[str] = ...) -> None: ...

class Quote(_message.Message):
    __slots__ = ("text", "served_by")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    text: str
    served_by: str
    def __init__(self, text: _Optional[str] = ..., served_by: _Optional[str] = ...) -> None: ...
