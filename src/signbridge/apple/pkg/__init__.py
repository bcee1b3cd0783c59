"""Flat installer packages: the xar archive, productsign's signing and pkgutil's verification. This ``__init__`` imports nothing."""
