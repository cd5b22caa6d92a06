"""Envoy's own validation rules, checked on the resources we generate. Pure.

Envoy's protos carry protoc-gen-validate rules as field options (``validate.rules``, and
``validate.required`` on oneofs); Envoy refuses a resource that breaks one, and gRPC's xDS
client refuses many of the same values. Rather than copy those rules, ``check`` reads them from
the descriptors the ``xds-protos`` package ships and walks a message (into ``Any`` payloads
too), so a mesh file that would give a NACK is refused before any proxy sees it.

Rules that need more than the value itself (``email``, ``hostname``, ``uri``...) and
``timestamp`` rules are not checked: nothing we generate carries those.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf import any_pb2, descriptor, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import Message
from validate import validate_pb2

from pilotfish.config.errors import ConfigError

FD = descriptor.FieldDescriptor
Field = Any  # a FieldDescriptor (its stubs type few of its attributes)
_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_NUMERIC = frozenset(
    {"float", "double", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
     "fixed64", "sfixed32", "sfixed64"}
)  # fmt: skip
_ANY = any_pb2.Any.DESCRIPTOR.full_name
_DURATION = duration_pb2.Duration.DESCRIPTOR.full_name


def check(message: Message, path: str) -> None:
    """Raise ``ConfigError`` (naming the field path) at the first broken rule."""
    for where, problem in violations(message, path):
        raise ConfigError(where, f"{problem} (Envoy's validation rule)")


def violations(message: Message, path: str) -> Iterator[tuple[str, str]]:
    desc = message.DESCRIPTOR
    required_oneofs, fields = _plan(desc)
    for oneof in required_oneofs:
        if message.WhichOneof(oneof.name) is None:
            yield path, f"one of {', '.join(f.name for f in oneof.fields)} is required"
    for field, rules in fields:
        where = f"{path}.{field.name}"
        oneof = field.containing_oneof
        if oneof is not None and message.WhichOneof(oneof.name) != field.name:
            continue  # only the member that is set is checked (proto3 optional included)
        if field.is_repeated:
            values = getattr(message, field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                yield from _map(values, field, rules, where)
            else:
                yield from _repeated(values, field, rules, where)
            continue
        if field.type == FD.TYPE_MESSAGE:
            present = message.HasField(field.name)
            value = getattr(message, field.name)
            kind = rules.WhichOneof("type")
            required = rules.message.required or (
                (kind == "duration" and rules.duration.required)
                or (kind == "any" and rules.any.required)
            )
            if required and not present:
                yield where, "is required"
            if present:
                yield from _message_value(value, field, rules, where)
            continue
        # Scalars are checked set or not, as Envoy's generated validators do (proto3 has no
        # presence: an absent value is the zero value).
        yield from _scalar(getattr(message, field.name), field, rules, where)


_Plan = tuple[tuple[Any, ...], tuple[tuple[Field, Any], ...]]
_plans: dict[str, _Plan] = {}
_has_rules: dict[str, bool] = {}


def _plan(desc: Any) -> _Plan:
    """The oneofs a message type requires, and the fields worth a look: those with rules and
    those whose type may hold rules somewhere below. Most fields have neither, and walking
    only the rest keeps checking a whole snapshot cheap."""
    plan = _plans.get(desc.full_name)
    if plan is None:
        oneofs = tuple(o for o in desc.oneofs if o.GetOptions().Extensions[validate_pb2.required])
        fields = []
        for field in desc.fields:
            rules = field.GetOptions().Extensions[validate_pb2.rules]
            if rules.ByteSize() or (
                field.message_type is not None and _may_have_rules(field.message_type)
            ):
                fields.append((field, rules))
        plan = _plans[desc.full_name] = (oneofs, tuple(fields))
    return plan


def _may_have_rules(desc: Any) -> bool:
    name = desc.full_name
    known = _has_rules.get(name)
    if known is not None:
        return known
    if name == _ANY:
        return True  # whatever it holds may have rules
    _has_rules[name] = True  # a type reached again while deciding: assume so (safe)
    found = any(o.GetOptions().Extensions[validate_pb2.required] for o in desc.oneofs) or any(
        field.GetOptions().Extensions[validate_pb2.rules].ByteSize()
        or (field.message_type is not None and _may_have_rules(field.message_type))
        for field in desc.fields
    )
    _has_rules[name] = found
    return found


def _message_value(value: Any, field: Field, rules: Any, where: str) -> Iterator[tuple[str, str]]:
    name = field.message_type.full_name
    kind = rules.WhichOneof("type")
    if name == _DURATION:
        if kind == "duration":
            yield from _compare(_seconds(value), rules.duration, where, _duration_text)
        return
    if name in _WRAPPERS:
        if kind is not None and kind in _NUMERIC | {"string", "bytes", "bool"}:
            yield from _scalar_rules(value.value, kind, getattr(rules, kind), where)
        return
    if name == _ANY:
        if (
            kind == "any"
            and getattr(rules.any, "in")
            and value.type_url not in getattr(rules.any, "in")
        ):
            yield where, f"type {value.type_url} is not allowed here"
        inner = _unpack(value)
        if inner is not None:
            yield from violations(inner, where)
        return
    if not rules.message.skip:
        yield from violations(value, where)


def _repeated(values: Any, field: Field, rules: Any, where: str) -> Iterator[tuple[str, str]]:
    if rules.WhichOneof("type") == "repeated":
        rep = rules.repeated
        if rep.min_items and len(values) < rep.min_items:
            yield where, f"needs at least {rep.min_items} item(s)"
        if rep.HasField("max_items") and len(values) > rep.max_items:
            yield where, f"takes at most {rep.max_items} item(s)"
        item_rules = rep.items if rep.HasField("items") else None
    else:
        item_rules = None
    for i, value in enumerate(values):
        at = f"{where}[{i}]"
        if field.type == FD.TYPE_MESSAGE:
            if item_rules is not None:
                yield from _message_value(value, field, item_rules, at)
            else:
                yield from violations(value, at)
        elif item_rules is not None:
            yield from _scalar(value, field, item_rules, at)


def _map(values: Any, field: Field, rules: Any, where: str) -> Iterator[tuple[str, str]]:
    if (
        rules.WhichOneof("type") == "map"
        and rules.map.min_pairs
        and len(values) < rules.map.min_pairs
    ):
        yield where, f"needs at least {rules.map.min_pairs} entries"
    value_field = field.message_type.fields_by_name["value"]
    if value_field.type == FD.TYPE_MESSAGE:
        for key, value in values.items():
            yield from violations(value, f"{where}[{key}]")


def _scalar(value: Any, field: Field, rules: Any, where: str) -> Iterator[tuple[str, str]]:
    kind = rules.WhichOneof("type")
    if kind is None:
        return
    if kind == "enum":
        if rules.enum.defined_only and field.enum_type.values_by_number.get(value) is None:
            yield where, f"{value} is not a value of {field.enum_type.name}"
        return
    yield from _scalar_rules(value, kind, getattr(rules, kind), where)


def _scalar_rules(value: Any, kind: str, rules: Any, where: str) -> Iterator[tuple[str, str]]:
    if kind in _NUMERIC:
        if getattr(rules, "ignore_empty", False) and value == 0:
            return
        yield from _compare(value, rules, where, repr)
        allowed = getattr(rules, "in")
        if allowed and value not in allowed:
            yield where, f"{value} is not one of {list(allowed)}"
        if rules.not_in and value in rules.not_in:
            yield where, f"{value} is not allowed"
    elif kind in ("string", "bytes"):
        if rules.ignore_empty and not value:
            return
        size = len(value)
        chars = len(value) if kind == "string" else size
        if rules.min_len and chars < rules.min_len:
            yield where, f"must be at least {rules.min_len} long"
        if rules.HasField("max_len") and chars > rules.max_len:
            yield where, f"must be at most {rules.max_len} long"
        if kind == "string":
            encoded = len(value.encode())
            if rules.min_bytes and encoded < rules.min_bytes:
                yield where, f"must be at least {rules.min_bytes} bytes"
            if rules.HasField("max_bytes") and encoded > rules.max_bytes:
                yield where, f"must be at most {rules.max_bytes} bytes"
            if rules.prefix and not value.startswith(rules.prefix):
                yield where, f"must start with {rules.prefix!r}"
            allowed = getattr(rules, "in")
            if allowed and value not in allowed:
                yield where, f"{value!r} is not one of {list(allowed)}"
            if rules.well_known_regex and rules.strict is not False:
                bad = _header_problem(value, rules.well_known_regex)
                if bad:
                    yield where, bad


def _header_problem(value: str, which: int) -> str | None:
    """RFC 7230 header names and values (PGV's HTTP_HEADER_NAME / HTTP_HEADER_VALUE)."""
    broken = any(c in value for c in "\0\r\n")
    if which == validate_pb2.HTTP_HEADER_NAME and (broken or (value and not value.strip(":"))):
        return f"{value!r} is not a valid header name"
    if which == validate_pb2.HTTP_HEADER_VALUE and broken:
        return f"{value!r} is not a valid header value"
    return None


def _compare(value: Any, rules: Any, where: str, text: Any) -> Iterator[tuple[str, str]]:
    def bound(name: str) -> Any:
        if not rules.HasField(name):
            return None
        raw = getattr(rules, name)
        return _seconds(raw) if isinstance(raw, duration_pb2.Duration) else raw

    gt, gte, lt, lte = bound("gt"), bound("gte"), bound("lt"), bound("lte")
    if gt is not None and not value > gt:
        yield where, f"must be greater than {text(gt)}"
    if gte is not None and not value >= gte:
        yield where, f"must be at least {text(gte)}"
    if lt is not None and not value < lt:
        yield where, f"must be less than {text(lt)}"
    if lte is not None and not value <= lte:
        yield where, f"must be at most {text(lte)}"


def _seconds(d: duration_pb2.Duration) -> float:
    seconds: float = d.seconds + d.nanos / 1e9
    return seconds


def _duration_text(seconds: float) -> str:
    return f"{seconds:g}s"


def _unpack(packed: any_pb2.Any) -> Message | None:
    name = packed.type_url.rpartition("/")[2]
    try:
        found = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return None  # a type we never import is not one we generate
    inner: Message = message_factory.GetMessageClass(found)()
    packed.Unpack(inner)
    return inner
