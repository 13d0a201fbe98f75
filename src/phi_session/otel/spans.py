"""`SpanData`: the one shape ingest reads, built from SDK spans, OTLP protobuf or OTLP JSON.

Bad OTLP input raises `OtlpDecodeError` (the whole payload is unreadable); a span that is
readable but unusable (ids of the wrong size, zero ids) is skipped and counted, which the
endpoint reports as an OTLP partial success. Invalid UTF-8 in a protobuf string (which
protobuf refuses, the Collector's decoder does not), or a lone surrogate escaped in a JSON
string (JavaScript's ``JSON.stringify`` writes one for text cut inside an emoji), is
replaced with U+FFFD in that string only, and counted: the endpoint says so in a partial
success with no span rejected (the OTLP spec's warning form). So is an attribute value
nested deeper than `_MAX_DEPTH` levels (valid OTLP: protobuf reads some 45): below that
level it is kept as its OTLP JSON text (as `clip_depth` keeps what is nested too deep in a
session; checked as the levels above are: an invalid AnyValue is refused at any depth),
bounded by the payload's size, rather than refusing the payload (a 400 is final
for an exporter: the batch's other spans were lost) or the span (its loop lost for a value
ingest never reads: it reads text and flat arrays only).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import string
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any, NamedTuple

import msgspec

from .._strict import json_text
from ..errors import OtlpDecodeError, OtlpRefused

__all__ = [
    "OtlpDecodeError",
    "OtlpSpans",
    "SpanData",
    "read_otlp",
    "spans_from_otlp_json",
    "spans_from_otlp_proto",
    "spans_from_sdk",
]

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_MAX_DEPTH = 32
_HEX = frozenset(string.hexdigits)
_NO_SPAN = "0" * 16
_REMOTE_PARENT = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK: the parent is in another process
_URLSAFE = str.maketrans("-_", "+/")
MEDIA_JSON = "application/json"
MEDIA_PROTOBUF = "application/x-protobuf"
MEDIA_PROTOBUFS = (MEDIA_PROTOBUF, "application/protobuf")  # the OTLP/HTTP spec names both


class SpanEvent(msgspec.Struct, frozen=True, gc=False):
    name: str
    time: int
    attributes: dict[str, Any]


class SpanData(msgspec.Struct, kw_only=True, gc=False):
    """One finished span, reduced to what ingest reads. Ids are ints; times are ns.

    `parent_id` is None for a root of the trace here: a span without a parent, or one
    whose parent is remote (the caller's, in another process: it may never come here);
    then `remote_parent_id` is that parent's span id.
    """

    trace_id: int
    span_id: int
    parent_id: int | None
    name: str
    kind: str
    start: int
    end: int
    attributes: dict[str, Any]
    events: list[SpanEvent] = msgspec.field(default_factory=list)
    error: bool = False
    status_message: str = ""
    resource: dict[str, Any] = msgspec.field(default_factory=dict)
    remote_parent_id: int | None = None


def spans_from_sdk(span: Any) -> SpanData | None:
    """A `SpanData` for an SDK `ReadableSpan` (None when it has no valid context)."""
    context = span.context
    if context is None or not context.trace_id or not context.span_id:
        return None
    status, parent = span.status, span.parent
    remote = parent is not None and parent.is_remote
    return SpanData(
        trace_id=context.trace_id,
        span_id=context.span_id,
        parent_id=parent.span_id if parent is not None and not remote else None,
        remote_parent_id=parent.span_id if remote else None,
        name=span.name,
        kind=span.kind.name,
        start=span.start_time or 0,
        end=span.end_time or span.start_time or 0,
        attributes=dict(span.attributes or {}),
        events=[SpanEvent(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        error=status.status_code.name == "ERROR",
        status_message=status.description or "",
        resource=dict(span.resource.attributes) if span.resource is not None else {},
    )


# -- OTLP protobuf ----------------------------------------------------------------------------------


def _too_deep(value: Any, clipped: list[int]) -> str:
    """An AnyValue nested past `_MAX_DEPTH` (in the JSON mapping's shape): its JSON text,
    counted in `clipped`."""
    clipped[0] += 1
    return json_text(value)


def _proto_value(value: Any, clipped: list[int], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped,unused-ignore]

        return _too_deep(MessageToDict(value), clipped)
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(_proto_value(v, clipped, depth + 1) for v in value.array_value.values)
    if which == "kvlist_value":
        return {kv.key: _proto_value(kv.value, clipped, depth + 1) for kv in value.kvlist_value.values}
    return getattr(value, which)


def _proto_attributes(pairs: Any, clipped: list[int]) -> dict[str, Any]:
    return {kv.key: _proto_value(kv.value, clipped) for kv in pairs}


@functools.cache
def _lenient_request() -> tuple[Any, frozenset[str]]:
    """ExportTraceServiceRequest with every string field read as bytes (the same wire format,
    unchecked), and the full names of those fields."""
    from google.protobuf import (  # type: ignore[import-untyped,unused-ignore]
        descriptor_pb2,
        descriptor_pool,
        message_factory,
    )
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    pool = descriptor_pool.DescriptorPool()
    texts: set[str] = set()
    added: set[str] = set()

    def as_bytes(prefix: str, messages: Any) -> None:
        for message in messages:
            name = f"{prefix}.{message.name}"
            for field in message.field:
                if field.type == field.TYPE_STRING:
                    field.type = field.TYPE_BYTES
                    texts.add(f"{name}.{field.name}")
            as_bytes(name, message.nested_type)

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        as_bytes(proto.package, proto.message_type)
        pool.Add(proto)
        added.add(file.name)

    add(trace_service_pb2.DESCRIPTOR)
    request = trace_service_pb2.ExportTraceServiceRequest.DESCRIPTOR.full_name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(request)), frozenset(texts)


def _valid_utf8(message: Any, texts: frozenset[str]) -> int:
    """Replace invalid UTF-8 in the string fields of a lenient `message` with U+FFFD (as
    ``bytes.decode(errors="replace")`` does), in place; returns how many strings were altered."""
    altered = 0
    for field, value in message.ListFields():
        if field.full_name in texts:
            for index, raw in enumerate([value] if isinstance(value, bytes) else value):
                fixed = raw.decode("utf-8", "replace").encode()
                if fixed != raw:
                    altered += 1
                    if isinstance(value, bytes):
                        setattr(message, field.name, fixed)
                    else:
                        value[index] = fixed
        elif field.type == field.TYPE_MESSAGE:
            for item in [value] if hasattr(value, "ListFields") else value:
                altered += _valid_utf8(item, texts)
    return altered


def _parse_request(payload: bytes) -> tuple[Any, int]:
    """(ExportTraceServiceRequest, strings whose invalid UTF-8 was replaced). Only a payload
    the strict parse refuses takes the lenient one: valid payloads pay nothing."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(payload)
        return request, 0
    except Exception as error:  # protobuf's DecodeError, RecursionError on deep nesting...
        refused = OtlpDecodeError(f"not an OTLP protobuf ExportTraceServiceRequest: {error}")
    lenient, texts = _lenient_request()
    try:
        loose = lenient.FromString(payload)
    except Exception:
        raise refused from None
    altered = _valid_utf8(loose, texts)
    if not altered:  # not an encoding problem
        raise refused
    request.ParseFromString(loose.SerializeToString())
    return request, altered


def spans_from_otlp_proto(payload: bytes) -> tuple[list[SpanData], int]:
    """(spans, skipped) of a protobuf ExportTraceServiceRequest. Raises `OtlpDecodeError`.

    Invalid UTF-8 in a string is replaced (U+FFFD) rather than refusing the payload.
    """
    read = read_otlp(payload, MEDIA_PROTOBUF)
    return read.spans, read.skipped


def _spans_from_proto(payload: bytes, max_spans: int | None) -> OtlpSpans:
    request, altered = _parse_request(payload)
    _check_count(sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans), max_spans)
    out: list[SpanData] = []
    skipped, clipped = 0, [0]
    for resource_spans in request.resource_spans:
        resource = _proto_attributes(resource_spans.resource.attributes, clipped)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                ids = _proto_ids(span)
                if ids is None:
                    skipped += 1
                    continue
                remote = bool(span.flags & _REMOTE_PARENT)
                out.append(
                    SpanData(
                        trace_id=ids[0],
                        span_id=ids[1],
                        parent_id=None if remote else ids[2],
                        remote_parent_id=ids[2] if remote else None,
                        name=span.name,
                        kind=_KINDS.get(span.kind, "UNSPECIFIED"),
                        start=span.start_time_unix_nano,
                        end=max(span.end_time_unix_nano, span.start_time_unix_nano),
                        attributes=_proto_attributes(span.attributes, clipped),
                        events=[
                            SpanEvent(e.name, e.time_unix_nano, _proto_attributes(e.attributes, clipped))
                            for e in span.events
                        ],
                        error=span.status.code == 2,
                        status_message=span.status.message,
                        resource=resource,
                    )
                )
    return OtlpSpans(out, skipped, altered, clipped[0])


def _proto_ids(span: Any) -> tuple[int, int, int | None] | None:
    if len(span.trace_id) != 16 or len(span.span_id) != 8 or len(span.parent_span_id) not in (0, 8):
        return None
    trace_id, span_id = int.from_bytes(span.trace_id, "big"), int.from_bytes(span.span_id, "big")
    parent = int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else 0
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, parent or None


# -- OTLP JSON (the protobuf JSON mapping, ids in hex as OTLP/HTTP JSON requires) ------------------


def _json_value(value: Any, clipped: list[int], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        _check_json_value(value)  # as valid as above: only its depth differs
        return _too_deep(value, clipped)
    member, inner = _any_value(value)
    if member == "arrayValue":
        return tuple(_json_value(v, clipped, depth + 1) for v in inner)
    if member == "kvlistValue":
        return _json_attributes(inner, clipped, depth + 1)
    return inner


def _check_json_value(value: Any) -> None:
    """Raise `OtlpDecodeError` if `value`, an AnyValue nested at any depth, is not one
    (iteratively: it may be nested as deep as the body is long)."""
    stack = [value]
    while stack:
        member, inner = _any_value(stack.pop())
        if member == "arrayValue":
            stack.extend(inner)
        elif member == "kvlistValue":
            stack.extend(_pair(pair)[1] for pair in inner)


def _any_value(value: Any) -> tuple[str | None, Any]:
    """The member of an AnyValue and its value: a scalar read, or the list of an arrayValue's
    values or a kvlistValue's pairs (unread); (None, None) for none. Raises `OtlpDecodeError`."""
    if not isinstance(value, dict) or len(value) > 1:
        raise OtlpDecodeError("an AnyValue must be an object with at most one member")
    for key, inner in value.items():
        if inner is None:  # the mapping's null: the member's default, as if unset
            return None, None
        if key == "stringValue" and isinstance(inner, str):
            return key, inner
        if key == "boolValue" and isinstance(inner, bool):
            return key, inner
        if key == "intValue" and isinstance(inner, (int, str)) and not isinstance(inner, bool):
            return key, _int(inner, "intValue", signed=True)
        if key == "doubleValue" and isinstance(inner, (int, float, str)) and not isinstance(inner, bool):
            return key, _float(inner)
        if key == "bytesValue" and isinstance(inner, str):
            return key, _bytes(inner)
        if key in ("arrayValue", "kvlistValue") and isinstance(inner, dict):
            return key, _list(_member(inner, "values", []), "values")
        raise OtlpDecodeError(f"unsupported AnyValue member {key!r}")
    return None, None


def _pair(pair: Any) -> tuple[str, Any]:
    """The key and AnyValue of a KeyValue. Raises `OtlpDecodeError`."""
    if not isinstance(pair, dict) or not isinstance(pair.get("key"), str):
        raise OtlpDecodeError("an attribute must be an object with a string key")
    return pair["key"], _member(pair, "value", {})


def _json_attributes(pairs: Any, clipped: list[int], depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in _list(pairs, "attributes"):
        key, value = _pair(pair)
        out[key] = _json_value(value, clipped, depth)
    return out


def _member(document: dict[str, Any], key: str, default: Any) -> Any:
    """`document[key]`, `default` when missing or null (the JSON mapping accepts null for any
    field, meaning its default)."""
    value = document.get(key)
    return default if value is None else value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise OtlpDecodeError(f"{name}: expected an array")
    return value


def _int(value: Any, name: str, *, signed: bool = False) -> int:
    """A (u)int64: intValue is signed, times and flags are not."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise OtlpDecodeError(f"{name}: expected an integer") from None
    low = -(2**63) if signed else 0
    if not low <= number < low + 2**64:
        raise OtlpDecodeError(f"{name}: out of range")
    return number


def _float(value: Any) -> float:
    try:
        return float(value)  # also the mapping's "NaN", "Infinity" and "-Infinity"
    except (ValueError, OverflowError):  # (an integer of 400 digits)
        raise OtlpDecodeError("doubleValue: expected a number") from None


def _bytes(value: str) -> bytes:
    # The JSON mapping takes standard or URL-safe base64, padded or not.
    try:
        return base64.b64decode(value.translate(_URLSAFE) + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise OtlpDecodeError("bytesValue: expected base64") from None


def _hex_id(value: Any, size: int) -> int | None:
    # Hex digits only: int() would also take a sign, "0x", "_" and surrounding blanks.
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.issuperset(value):
        return None
    return int(value, 16) or None


def _iter_json_spans(document: Any, clipped: list[int]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    if not isinstance(document, dict):
        raise OtlpDecodeError("an OTLP JSON payload is an object with resourceSpans")
    for resource_spans in _list(_member(document, "resourceSpans", []), "resourceSpans"):
        if not isinstance(resource_spans, dict):
            raise OtlpDecodeError("resourceSpans: expected objects")
        resource = _member(resource_spans, "resource", {})
        attributes = _json_attributes(
            _member(resource, "attributes", []) if isinstance(resource, dict) else [], clipped
        )
        for scope_spans in _list(_member(resource_spans, "scopeSpans", []), "scopeSpans"):
            if not isinstance(scope_spans, dict):
                raise OtlpDecodeError("scopeSpans: expected objects")
            for span in _list(_member(scope_spans, "spans", []), "spans"):
                if not isinstance(span, dict):
                    raise OtlpDecodeError("spans: expected objects")
                yield span, attributes


def spans_from_otlp_json(payload: bytes) -> tuple[list[SpanData], int]:
    """(spans, skipped) of an OTLP/HTTP JSON ExportTraceServiceRequest. Raises `OtlpDecodeError`."""
    read = read_otlp(payload, MEDIA_JSON)
    return read.spans, read.skipped


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _repaired_text(value: Any, repaired: list[int]) -> Any:
    """`value` with each string holding a lone surrogate made valid (U+FFFD in its place)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            repaired[0] += 1
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, list):
        return [_repaired_text(item, repaired) for item in value]
    if isinstance(value, dict):
        return {_repaired_text(k, repaired): _repaired_text(v, repaired) for k, v in value.items()}
    return value


def _json_document(payload: bytes) -> tuple[Any, int]:
    """The parsed payload, and how many of its strings were repaired."""
    try:
        return msgspec.json.decode(payload), 0
    except (msgspec.DecodeError, RecursionError) as error:
        refused = error
    if b"\\ud" in payload or b"\\uD" in payload:  # msgspec refuses an escaped lone surrogate
        try:
            repaired = [0]
            return _repaired_text(json.loads(payload, parse_constant=_no_constant), repaired), repaired[0]
        except (ValueError, RecursionError):
            pass  # not JSON either: msgspec says why
    raise OtlpDecodeError(f"not JSON: {refused}") from None


def _spans_from_json(payload: bytes, max_spans: int | None) -> OtlpSpans:
    document, repaired = _json_document(payload)
    _check_count(sum(1 for _ in _iter_json_spans(document, [0])), max_spans)
    out: list[SpanData] = []
    skipped, clipped = 0, [0]
    for span, resource in _iter_json_spans(document, clipped):
        trace_id, span_id = _hex_id(span.get("traceId"), 16), _hex_id(span.get("spanId"), 8)
        parent_text = span.get("parentSpanId") or ""
        parent = _hex_id(parent_text, 8) if parent_text else None
        # An all-zero parent is none, as in protobuf (where it is the default).
        if trace_id is None or span_id is None or (parent is None and parent_text not in ("", _NO_SPAN)):
            skipped += 1
            continue
        start = _int(_member(span, "startTimeUnixNano", 0), "startTimeUnixNano")
        status = _member(span, "status", {})
        status = status if isinstance(status, dict) else {}
        name, kind = _member(span, "name", ""), _member(span, "kind", 0)
        remote = bool(_int(_member(span, "flags", 0), "flags") & _REMOTE_PARENT)
        out.append(
            SpanData(
                trace_id=trace_id,
                span_id=span_id,
                parent_id=None if remote else parent,
                remote_parent_id=parent if remote else None,
                name=name if isinstance(name, str) else "",
                kind=_KINDS.get(kind, "UNSPECIFIED")
                if isinstance(kind, int)
                else str(kind).removeprefix("SPAN_KIND_"),
                start=start,
                end=max(start, _int(_member(span, "endTimeUnixNano", start), "endTimeUnixNano")),
                attributes=_json_attributes(_member(span, "attributes", []), clipped),
                events=[
                    SpanEvent(
                        str(_member(e, "name", "")),
                        _int(_member(e, "timeUnixNano", 0), "timeUnixNano"),
                        _json_attributes(_member(e, "attributes", []), clipped),
                    )
                    for e in _list(_member(span, "events", []), "events")
                    if isinstance(e, dict)
                ],
                error=status.get("code") in (2, "STATUS_CODE_ERROR"),
                status_message=str(_member(status, "message", "")),
                resource=resource,
            )
        )
    return OtlpSpans(out, skipped, repaired, clipped[0])


class OtlpSpans(NamedTuple):
    """What an OTLP trace payload holds: its spans, how many were `skipped` (unusable ids),
    how many strings were `repaired` (invalid text replaced with U+FFFD) and how many
    attribute values were `clipped` (nested too deep: kept as text below `_MAX_DEPTH`)."""

    spans: list[SpanData]
    skipped: int
    repaired: int = 0
    clipped: int = 0

    @property
    def message(self) -> str:
        """What the sender is told (an OTLP partial success's error message), or ""."""
        said = []
        if self.skipped:
            said.append(f"{self.skipped} spans with invalid trace or span ids")
        if self.repaired:
            said.append(
                f"{self.repaired} strings with invalid UTF-8 or lone surrogates,"
                " recorded with U+FFFD in its place"
            )
        if self.clipped:
            said.append(
                f"{self.clipped} attribute values nested deeper than {_MAX_DEPTH} levels,"
                " kept with what is deeper as its OTLP JSON text"
            )
        return "; ".join(said)


def _check_count(count: int, max_spans: int | None) -> None:
    if (
        max_spans is not None and count > max_spans
    ):  # never fits: a 429 would have the client retry it forever
        raise OtlpRefused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{count} spans in one payload; at most {max_spans} may wait here: send smaller batches",
        )


def read_otlp(payload: bytes, media: str, *, max_spans: int | None = None) -> OtlpSpans:
    """The spans of an OTLP/HTTP trace payload of `media` (``application/json``,
    ``application/x-protobuf`` or ``application/protobuf``). Raises `OtlpDecodeError`, and
    `OtlpRefused` (413) for more than `max_spans` spans, counted before any is read (a span
    read costs about 100 times its bytes)."""
    if media == MEDIA_JSON:
        return _spans_from_json(payload, max_spans)
    if media in MEDIA_PROTOBUFS:
        return _spans_from_proto(payload, max_spans)
    raise OtlpDecodeError(f"unsupported content type {media!r}")
