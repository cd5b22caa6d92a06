"""The generated demo API (protos/pilotfish/demo/v1/demo.proto), imported in one place.

mypy is kept out of ``pilotfish/gen``: the gRPC stubs there are untyped and protobuf's base
classes are untyped here, so following the import makes ``mypy --strict`` report errors inside
generated files that nobody should edit. To mypy both modules are ``Any``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    demo_pb2: Any
    demo_pb2_grpc: Any
else:
    from pilotfish.gen.pilotfish.demo.v1 import demo_pb2, demo_pb2_grpc

__all__ = ["demo_pb2", "demo_pb2_grpc"]
