"""TLS as both kinds of destination use it: our client context, and a failure in words.

The destination's `tls` (README) is the same for DICOM TLS and https: the CA bundle its
certificate must chain to (the system's without it), checked with its host name or
address unless `verify` is off, and our certificate for one that requires a client's.
"""

from __future__ import annotations

import ssl

from router.model import TlsOptions

HINTS = {
    "CERTIFICATE_REQUIRED": " (the peer requires a client certificate: set tls cert and key)",
    "UNKNOWN_CA": " (the peer does not trust the CA of our certificate)",
    "BAD_CERTIFICATE": " (the peer refused our certificate)",
    "CERTIFICATE_EXPIRED": " (the peer says our certificate has expired)",
    "WRONG_VERSION_NUMBER": " (is it a TLS port? the peer did not answer in TLS)",
}
"""OpenSSL reasons for a failed handshake, in the words of the destination's `tls` set-up."""


def client_context(options: TlsOptions) -> ssl.SSLContext:
    """The client context for `options`; OSError or ValueError if a file is unusable."""
    context = ssl.create_default_context(cafile=options.ca_file)
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if options.cert_file:
        context.load_cert_chain(options.cert_file, options.key_file)
    return context


def failure(where: str, exc: BaseException | None) -> str | None:
    """Why TLS with `where` failed, if `exc` is a TLS error (else None): permanent."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the certificate of {where} is not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        hint = next((text for key, text in HINTS.items() if key in reason), "")
        return f"TLS handshake with {where} failed: {reason}{hint}"
    return None
