"""Erasure certificates: signed (Ed25519) and hash-chained, beside the withdrawal register.

A certificate is a JSON file ``certificates/<seq>.json`` in the register's folder (``DataLayout.withdrawals``,
outside the data root it speaks about). It holds the request, the keyed hash of the pseudonym (never the
pseudonym), per store what was removed and how it was verified, the releases and published results the participant
was part of, the date until which backups still hold the data, the code version, and:

* ``seq`` and ``previous``: its number (1, 2, ...) and the sha256 of the previous certificate's bytes (``""`` for
  the first). Deleting or editing a certificate breaks the chain at the next one; deleting the last one leaves the
  register's ``applied`` record pointing at a certificate that is gone. :func:`verify` checks both;
* ``public_key`` and ``signature``: the deployment's Ed25519 key (``cryptography``) signs the canonical JSON of
  everything else (keys sorted, no spaces). The key is ``$CBP_ERASURE_SIGNING_KEY`` (a PEM file) or, by default,
  ``erasure_signing.pem`` in the register's folder, created once (mode 0600); its public half is kept beside it
  (``erasure_signing.pub.pem``) and its fingerprint (``key_id``) is printed by ``cbp erase``: publish it, so that a
  certificate re-signed with another key is recognised.

Framework-free.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = "cbp-erasure-certificate/1"
KEY_ENV = "CBP_ERASURE_SIGNING_KEY"
KEY_NAME = "erasure_signing.pem"
PUB_NAME = "erasure_signing.pub.pem"
FOLDER = "certificates"


class CertificateError(ValueError):
    """A certificate or signing key that cannot be used."""


def canonical(doc: dict) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(pub)).hexdigest()[:16]


class Signer:
    """The deployment's signing key and the certificate folder of the register in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.dir = self.folder / FOLDER

    def private_key(self, *, create: bool = False) -> Ed25519PrivateKey:
        path = Path(os.environ[KEY_ENV]) if os.environ.get(KEY_ENV) else self.folder / KEY_NAME
        if not path.exists():
            if not create or os.environ.get(KEY_ENV):
                raise CertificateError(f"no erasure signing key at {path}")
            if self.certificates():
                raise CertificateError(f"{path.name} is missing but certificates exist: restore the key they were "
                                       f"signed with (or set {KEY_ENV})")
            key = Ed25519PrivateKey.generate()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            (self.folder / PUB_NAME).write_bytes(key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            return key
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise CertificateError(f"{path.name}: not an Ed25519 private key")
        return key

    def public_key(self) -> Ed25519PublicKey:
        """The deployment's public key: from the private key when readable, else the public file beside it."""
        try:
            return self.private_key().public_key()
        except CertificateError:
            pub = self.folder / PUB_NAME
            if not pub.exists():
                raise CertificateError("no erasure signing key (nothing was ever erased here?)") from None
            key = serialization.load_pem_public_key(pub.read_bytes())
            if not isinstance(key, Ed25519PublicKey):
                raise CertificateError(f"{pub.name}: not an Ed25519 public key") from None
            return key

    def certificates(self) -> list[Path]:
        return sorted(self.dir.glob("*.json")) if self.dir.exists() else []

    def issue(self, body: dict) -> tuple[Path, str]:
        """Sign ``body`` as the next certificate of the chain; (its path, the sha256 of its bytes)."""
        key = self.private_key(create=True)
        chain = self.certificates()
        previous = hashlib.sha256(chain[-1].read_bytes()).hexdigest() if chain else ""
        seq = int(json.loads(chain[-1].read_text())["seq"]) + 1 if chain else 1
        doc = {**body, "format": FORMAT, "seq": seq, "previous": previous,
               "public_key": _raw(key.public_key()).hex(), "key_id": key_id(key.public_key())}
        doc["signature"] = base64.b64encode(key.sign(canonical(doc))).decode()
        data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{seq:06d}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)   # never overwrites a certificate
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return path, hashlib.sha256(data).hexdigest()


def _signature_problem(name: str, doc: dict, deployment: Ed25519PublicKey | None) -> str | None:
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(doc["public_key"]))
        pub.verify(base64.b64decode(doc["signature"]), canonical(doc))
    except (KeyError, ValueError, TypeError, InvalidSignature):
        return f"{name}: the signature does not match its content"
    if deployment is not None and _raw(pub) != _raw(deployment):
        return f"{name}: signed by key {key_id(pub)}, not by this deployment's key {key_id(deployment)}"
    return None


def verify(path: Path, folder: Path, applied: list[dict], marks: set[str] = frozenset()) -> list[str]:
    """Problems of the certificate at ``path`` and of the chain it belongs to (empty: it holds). ``folder``: the
    register's folder; ``applied``: the register's ``applied`` records (each names a certificate and its sha256);
    ``marks``: the certificates the warehouse remembers (a second witness, in another store: deleting certificates
    together with their register records is found there)."""
    problems: list[str] = []
    signer = Signer(folder)
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        return [f"{path.name}: cannot be read as a certificate ({type(exc).__name__})"]
    if doc.get("format") != FORMAT:
        problems.append(f"{path.name}: format {doc.get('format')!r} is not {FORMAT}")
    try:
        own = _signature_problem(path.name, doc, signer.public_key())
    except CertificateError as exc:
        own = str(exc)
    if own:
        problems.append(own)
    # the chain: contiguous numbers, each naming the sha256 of the one before, each signed by the deployment
    try:
        deployment_key = signer.public_key()
    except CertificateError:
        deployment_key = None
    chain = signer.certificates()
    previous, expect = "", 1
    for p in chain:
        data = p.read_bytes()
        try:
            c = json.loads(data)
        except ValueError:
            problems.append(f"chain: {p.name} is not a certificate")
            previous, expect = hashlib.sha256(data).hexdigest(), expect + 1
            continue
        if p.resolve() != path.resolve():
            other = _signature_problem(p.name, c, deployment_key)
            if other:
                problems.append(f"chain: {other}")
        if int(c.get("seq", -1)) != expect:
            problems.append(f"chain: {p.name} has number {c.get('seq')}, the chain expects {expect} (a certificate "
                            "was deleted or renamed)")
        elif c.get("previous") != previous:
            problems.append(f"chain: {p.name} does not name the sha256 of the certificate before it (edited or "
                            "replaced)")
        previous, expect = hashlib.sha256(data).hexdigest(), int(c.get("seq", expect)) + 1
    if path.resolve() not in {p.resolve() for p in chain}:
        problems.append(f"{path.name}: not in the deployment's certificate chain ({signer.dir})")
    names = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in chain}
    recorded = {a.get("certificate") for a in applied}
    problems += [f"chain: {n} is named by no record of the register (an interrupted erasure, or its record removed)"
                 for n in names if n not in recorded]
    problems += [f"warehouse: it remembers certificate {m}, which is gone from the chain" for m in sorted(marks)
                 if m not in names]
    for a in applied:
        cert = a.get("certificate")
        if cert not in names:
            problems.append(f"register: request {a.get('request_id')} was applied with certificate {cert}, which is "
                            "gone")
        elif a.get("certificate_sha256") != names[cert]:
            problems.append(f"register: certificate {cert} differs from the one recorded when request "
                            f"{a.get('request_id')} was applied")
    return problems
