"""The package's public surface: names, where they live, the version."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import phi_session as ps
from phi_session import events

ROOT = Path(__file__).resolve().parent.parent


def _isort_key(name: str) -> tuple[bool, bool, str]:
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical.
    return (not name.isupper(), not name[:1].isupper(), name)


def test_all_is_sorted_and_every_name_resolves() -> None:
    for module in (ps, events):
        assert module.__all__ == sorted(module.__all__, key=_isort_key), module.__name__
        assert len(set(module.__all__)) == len(module.__all__)
        assert all(getattr(module, name) is not None for name in module.__all__)


def test_timestamp_and_float32_come_from_public_modules() -> None:
    assert ps.Timestamp is events.Timestamp and ps.Float32 is events.Float32
    snapshot = events.LoopConfigSnapshot(model="m", provider="p", config_id="c", temperature=0.1)
    assert isinstance(snapshot.temperature, ps.Float32)
    assert {"Float32", "Timestamp"} <= set(ps.__all__) & set(events.__all__)


def test_the_version_has_one_home() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject
    assert importlib.metadata.version("phi-session") == ps.__version__


def test_the_otlp_errors_live_in_the_hierarchy_and_keep_their_import_paths() -> None:
    from phi_session import errors
    from phi_session.otel import endpoint, spans

    assert spans.OtlpDecodeError is errors.OtlpDecodeError and endpoint.Backpressure is errors.Backpressure
    for error in (errors.OtlpDecodeError, errors.Backpressure):
        assert error.__module__ == "phi_session.errors" and issubclass(error, errors.PhiSessionError)
    assert issubclass(errors.OtlpDecodeError, errors.DecodeError)


def test_every_error_class_is_defined_in_the_errors_module() -> None:
    """One home for the hierarchy: a module raising its own error imports it from there."""
    import importlib
    import pkgutil

    import phi_session
    from phi_session.errors import PhiSessionError

    optional = ("phi_session.adapters.", "phi_session.otel.", "phi_session.broker.", "phi_session.web.")
    for info in pkgutil.walk_packages(phi_session.__path__, "phi_session."):
        try:
            importlib.import_module(info.name)
        except ImportError:
            assert info.name.startswith(optional), info.name  # an optional extra that is missing
    stray: list[str] = []
    pending = [PhiSessionError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("phi_session.") and cls.__module__ != "phi_session.errors":
            stray.append(f"{cls.__module__}.{cls.__qualname__}")
    assert not stray


def test_the_readme_lists_every_error_class() -> None:
    """Its list of the hierarchy left out NotAJournal, RecordedToolError and RecordedModelError."""
    from phi_session import errors

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listing = readme[readme.index("Everything raises subclasses of `PhiSessionError`") :]
    listing = listing[: listing.index("\n\n")]
    classes = [
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.PhiSessionError) and name != "PhiSessionError"
    ]
    assert [name for name in classes if f"`{name}`" not in listing] == []
    assert issubclass(ps.InvalidArgument, errors.PhiSessionError) and issubclass(
        ps.InvalidArgument, ValueError
    )
