"""Flat packages (xar archives): read, build, and re-sign them the way ``productsign`` does.

- :class:`XarArchive` reads and checks a package (header, TOC, heap ranges, TOC checksum) and
  streams file data out with its checksums verified.
- :func:`write_package` builds an unsigned package from files.
- :func:`prepare_signed` / :func:`write_signed` replace a package's signatures,
  checking every file's archived checksum as its data is copied; :func:`~.archive.signature_data` reads them back.

Signing a package::

    prepared = prepare_signed(XarArchive.open(path), "sha256", 256, 9000, [leaf_der, *chain_der])
    def sign(prepared):                            # called once the file data is copied and checked
        rsa = token_sign(prepared.toc_checksum)    # PKCS#1 v1.5, DigestInfo(sha256, checksum)
        cms = build_cms(prepared.toc_checksum, ...)  # detached SignedData over the checksum
        return rsa, cms
    write_signed(prepared, out_path, sign)
    if prepared.dropped_ticket: warn("the stapled notarization ticket was removed")

Modules: header (28-byte header), tocxml (safe XML in/out), toc (TOC model), archive (reader),
filedata (decoding file data), writer (unsigned packages), signing (signature surgery), output
(the package's atomic output and heap copies, on :mod:`signbridge.atomic`), errors.
"""
