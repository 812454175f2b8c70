"""The status page (`page.html`): one self-contained HTML file, and the Content-Security-Policy
that pins it to itself.

The page has no external assets (it must work offline) and renders `/status.json` with one
inline script. The policy allows exactly that script (by its sha256, CSP Level 2:
https://www.w3.org/TR/CSP2/#script-src-hash-usage), inline styles, and fetches to the page's
own origin: if a host name or run id ever carried markup, nothing injected could run or load.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


@dataclass(frozen=True)
class StatusPage:
    html: bytes
    content_security_policy: str


def load_page() -> StatusPage:
    """The page's bytes and its Content-Security-Policy header value."""
    html = resources.files("diloco.status").joinpath("page.html").read_bytes()
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in _SCRIPT.findall(html)
    )
    policy = (
        "default-src 'none'; "
        f"script-src {hashes}; "
        "style-src 'unsafe-inline'; "
        "img-src data:; "
        "connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return StatusPage(html=html, content_security_policy=policy)
