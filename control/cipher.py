"""The control plane's cipher for the secrets it must read back: webhook signing secrets
(`control.notices`) and signed-URL keys (`control.signing_keys`).

Fernet (AES-128-CBC with HMAC-SHA256, a timestamped token) keyed by the operator's `secret_key`
(any string of 32+ random characters: SHA-256 makes it the 32-byte key Fernet wants). Without a
`secret_key` there is no cipher, and the control plane refuses to store such secrets.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet


def fernet(secret_key: str) -> Fernet | None:
    """The cipher keyed by `secret_key`; None when it is unset (empty)."""
    if not secret_key:
        return None
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret_key.encode()).digest()))
