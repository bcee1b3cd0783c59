"""The crypto provider (``signbridge start``): a process that serves the service's certificates as a
PKCS#11 token. settings: what it is told; logs: its logging; naming: token names; registry: the
running tokens' records; registration: their p11-kit module files; daemon: starting, stopping and
the token process; loader: certificates from the service; signer: signatures through the service."""
