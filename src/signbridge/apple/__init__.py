"""Apple's signing formats and tools, parsed and written by signbridge's own code. From the bottom up:

- :mod:`.plist`, :mod:`.certificates`, :mod:`.trust`: the one property-list reader, what Apple's
  certificates say (usages, team identifier), and Apple's anchors and purposes for the crypto
  core's path validator.
- :mod:`.codesig`: code signatures whatever they sign (blobs, CodeDirectories, entitlements, the
  requirement language, the CMS and its signer, reading a signature back, verification's outcome).
- By format, each with its readers below its signer: :mod:`.macho` (Mach-O files), :mod:`.bundle`
  (bundles and ``.ipa`` archives), :mod:`.dmg` (disk images), :mod:`.pkg` (installer packages),
  :mod:`.notary` (tickets, stapling, pre-flight and the Notary API).
- The tools' entry points: :mod:`.codesign` (``codesign -s``), :mod:`.verify_code`
  (``codesign --verify``), :mod:`.display` (``codesign -d``), and :mod:`.settings`, what the tools
  read from the environment and the configuration file.

No package ``__init__`` here imports anything, so a reader never pulls in a signer.
"""
