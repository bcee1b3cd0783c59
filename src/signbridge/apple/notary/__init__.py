"""Notarization: the offline pre-flight, notarization tickets (staple, validate) and the Notary API client.

- :mod:`.preflight` checks, before anything is uploaded, what Apple's notary service checks.
- :mod:`.ticket` parses the ``s8ch`` tickets Apple issues; :mod:`.stapler` attaches them to apps,
  disk images and packages and validates them offline; :mod:`.lookup` fetches them.
- :mod:`.api` speaks the Notary API v2 with an App Store Connect key (:mod:`.credentials`);
  :mod:`.upload` sends the file to the object store.
"""
