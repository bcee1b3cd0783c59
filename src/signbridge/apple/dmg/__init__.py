"""UDIF disk images (``.dmg``): the ``koly`` trailer, and code signatures as Apple's codesign writes them.

A signed image is its original bytes, then an embedded-signature SuperBlob, then the 512-byte
trailer whose code-signature fields point at that SuperBlob::

    data fork | property list | SuperBlob (CodeDirectory, requirements, CMS, [ticket]) | koly

:mod:`.udif` reads the trailer and the signature (it is what readers import), :mod:`.verify`
checks and displays a signature, :mod:`.sign` writes one. This package's ``__init__`` imports
nothing, so a reader never pulls in the signer.
"""
