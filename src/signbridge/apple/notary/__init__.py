"""Notarization: the offline pre-flight, stapling, and the Notary API client.

- :mod:`.preflight` checks, before anything is uploaded, what Apple's notary service checks;
  :mod:`.payload` reads package payloads, zips and disk images within limits.
- :mod:`.stapler` attaches tickets (parsed by :mod:`signbridge.apple.notary.ticket`) to apps, disk
  images and packages and validates them offline; :mod:`.lookup` fetches them.
- :mod:`.api` speaks the Notary API v2 with an App Store Connect key (:mod:`.credentials`);
  :mod:`.upload` sends the file to the object store.
"""
