"""Import the OpenTelemetry packages, or say which extra installs them."""

from __future__ import annotations

from ..errors import MissingExtra


def require_sdk(user: str = "phi_session.otel", extra: str = "otel") -> None:
    """Raise `MissingExtra` unless the OpenTelemetry SDK is importable: `user` needs it,
    and `extra` (which must install all that `user` needs) installs it."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as error:
        raise MissingExtra(
            f"{user} needs the OpenTelemetry SDK ({error}): pip install 'phi-session[{extra}]'"
        ) from None


def require_proto() -> None:
    """Raise `MissingExtra` unless opentelemetry-proto is importable (OTLP protobuf payloads)."""
    try:
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
    except ImportError as error:
        raise MissingExtra(
            f"OTLP protobuf needs opentelemetry-proto ({error}): pip install 'phi-session[otlp]'"
        ) from None
