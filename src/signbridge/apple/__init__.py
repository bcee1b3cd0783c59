"""Apple code-signing formats, parsed and written by signbridge's own code.

- :mod:`.macho` parses thin and universal Mach-O files and validates their layout.
- :mod:`.macho_writer` makes room for a signature and re-lays universal files.
- :mod:`.blobs` holds the generic blob and SuperBlob codecs and their magic numbers and slots.
- :mod:`.codedirectory` builds, parses and hashes CodeDirectories (page hashing, cdhash).
- :mod:`.requirements` encodes, parses and renders code requirements.
- :mod:`.entitlements` builds the XML and DER entitlement blobs.
- :mod:`.macho_signing` signs a whole file: ad hoc, or with the engine's CMS signer.
- :mod:`.codesign` is ``codesign -s``'s engine: :mod:`.codesign_options` (the flags, errors,
  results), :mod:`.cms_signer` (the CMS over the CodeDirectories), :mod:`.code_files` (input and
  staged output), :mod:`.bundle_signing` and :mod:`.detached_signing`.
- :mod:`.dmg` reads, verifies and signs UDIF disk images (the ``koly`` trailer and its signature).
- :mod:`.ticket` reads stapled notarization tickets and checks their signature.
"""
