"""Distinct errors for encrypted and signed data, each with the exit code DESIGN.md gives it."""
from __future__ import annotations

from toolkit.errors import BadInputError, EnvironmentProblem, VerificationFailed


class AgeHeaderError(BadInputError):
    """The age header is malformed or breaks a MUST of the spec (exit 3)."""


class AgeArmorError(AgeHeaderError):
    """The ASCII armor (PEM) around an age file is malformed (exit 3, as every header failure)."""


class NoMatchingIdentity(BadInputError):
    """None of the given identities (keys or passphrase) opens the file (exit 3)."""


class AgeMacError(VerificationFailed):
    """The header MAC does not match: the header was altered (exit 5)."""


class AgePayloadError(VerificationFailed):
    """A payload chunk fails authentication, or data follows the final chunk (exit 5)."""


class TruncatedPayload(VerificationFailed):
    """The payload ends before its final chunk (exit 5)."""


class KeyFormatError(BadInputError):
    """A key, recipient or identity that cannot be parsed (exit 3)."""


class SignatureError(VerificationFailed):
    """A signature that is malformed, made by a key not allowed, or does not verify (exit 5)."""


class PostQuantumUnavailable(EnvironmentProblem):
    """Post-quantum age needs ML-KEM and HPKE, which this interpreter's cryptography lacks (exit 4)."""
