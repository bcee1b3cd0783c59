"""The keychain: what Apple's tools find when a CryptoTokenKit token is inserted, from the running
signbridge tokens. tokens: the running tokens by name, and whether p11-kit sees them; discovery:
their identities and chains; selection: the one identity a name designates; key: signing through
the token."""
