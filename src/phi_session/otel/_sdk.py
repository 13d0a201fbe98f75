"""Import the OpenTelemetry packages, or say which extra installs them."""

from __future__ import annotations

from ..errors import MissingExtra


def require_sdk() -> None:
    """Raise `MissingExtra` unless the OpenTelemetry SDK is importable."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as error:
        raise MissingExtra(
            f"phi_session.otel needs the OpenTelemetry SDK ({error}): pip install 'phi-session[otel]'"
        ) from None


def require_proto() -> None:
    """Raise `MissingExtra` unless opentelemetry-proto is importable (OTLP protobuf payloads)."""
    try:
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
    except ImportError as error:
        raise MissingExtra(
            f"OTLP protobuf needs opentelemetry-proto ({error}): pip install 'phi-session[otlp]'"
        ) from None
