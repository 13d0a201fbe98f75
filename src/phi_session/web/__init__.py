"""The local, read-only web viewer: ``phi-session serve`` (see `phi_session.web.server`).

The page is plain HTML, CSS and JavaScript shipped in ``static/`` (no build step);
the server is the standard library's, with no framework dependency.
"""

from .server import ViewerServer, is_loopback, make_server

__all__ = ["ViewerServer", "is_loopback", "make_server"]
