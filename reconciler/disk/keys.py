"""Ed25519 key files: the network's signing keys and the node's own receipt key.

Edge module (files). A private key file holds the 32-byte seed in hex and is written 0600;
its public file holds the 32 public bytes in hex. The key id is sha256 of the public bytes.
"""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey

from reconciler.core.envelope import keyid_of, signing_key_from_seed
from reconciler.core.errors import SettingsError
from reconciler.disk.atomic import write_atomic

__all__ = ["generate_key", "public_hex", "read_private_key", "read_public_key"]


def generate_key(private_path: Path, public_path: Path) -> SigningKey:
    """Make a new key pair; refuses to overwrite an existing private key."""
    if private_path.exists():
        raise SettingsError(f"{private_path} exists; refusing to overwrite a key")
    key = SigningKey.generate()
    write_atomic(private_path, bytes(key).hex().encode("ascii") + b"\n", mode=0o600)
    write_atomic(public_path, public_hex(key).encode("ascii") + b"\n")
    return key


def public_hex(key: SigningKey) -> str:
    return bytes(key.verify_key).hex()


def read_private_key(path: Path) -> SigningKey:
    try:
        text = path.read_text(encoding="ascii").strip()
        return signing_key_from_seed(bytes.fromhex(text))
    except FileNotFoundError:
        raise SettingsError(f"key file {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path} is not a reconciler private key ({exc})") from exc


def read_public_key(path: Path) -> tuple[str, bytes]:
    """(keyid, raw public bytes) from a ``.pub`` file, or from a private key file."""
    try:
        text = path.read_text(encoding="ascii").strip()
        raw = bytes.fromhex(text)
    except FileNotFoundError:
        raise SettingsError(f"key file {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path} is not a reconciler key ({exc})") from exc
    if len(raw) != 32:
        raise SettingsError(f"{path} does not hold 32 key bytes")
    if path.suffix == ".key":  # a private seed: derive its public half
        raw = bytes(signing_key_from_seed(raw).verify_key)
    return keyid_of(raw), raw
