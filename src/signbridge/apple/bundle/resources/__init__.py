"""The resource seal of a bundle, ``_CodeSignature/CodeResources``: its rules and what they select
(:mod:`.rules`), hashing the files it seals (:mod:`.hashing`), reading a stored seal (:mod:`.seal`),
writing one (:mod:`.writing`) and checking a bundle against one (:mod:`.checking`).

CodeResources is an XML property list with four keys:

- ``rules`` / ``rules2``: which paths (relative to the bundle's content root, ``Contents/`` or
  ``Versions/A/``) are sealed, as regular expressions with ``omit``, ``optional``, ``nested`` and
  ``weight``; the rule of highest weight that matches a path decides (an omitting rule wins a tie,
  as Apple's seals show). A stored seal's rules are untrusted: :class:`RuleSet` evaluates them
  with RE2 in linear time (POSIX syntax, bounded count, length and weight). signbridge writes
  Apple's defaults: the ``Resources/`` rules for bundles with a ``Contents`` or ``Versions``
  directory, the iOS-style rules (everything at the root is a resource, nothing is nested code)
  for shallow bundles.
- ``files`` (version 1): SHA-1 of every regular file the v1 rules select.
- ``files2`` (version 2): per path a dict of digests (``hash`` = SHA-1, ``hash2`` = SHA-256), a
  ``{symlink: target}``, or for nested code ``{cdhash, requirement}``; ``optional`` when the rule
  says so.

Scanning follows Apple's ResourceBuilder: symbolic links are never followed; a directory that
matches a ``nested`` rule and whose name contains a dot is nested code (a bundle) and is not entered;
a regular file that matches a ``nested`` rule is nested code when it is a Mach-O file. Apple would
sign a non-Mach-O file there (a script) with a detached signature; signbridge seals it as a plain
resource, which Apple's verifier accepts. Excluded always: ``_CodeSignature``, ``CodeResources``
(where a stapled ticket lives), ``_MASReceipt`` and the main executable.
"""
