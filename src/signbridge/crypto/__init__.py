"""The crypto core: hash algorithms, signatures and their one verifier, certificates and chains,
CMS SignedData, and RFC 3161 timestamps."""
