"""The crypto provider: a process that serves the service's certificates as a PKCS#11 token."""
