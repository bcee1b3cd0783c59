"""Mach-O files, thin and universal: their numbers, parsing and the layout check, making room for a signature, signing and verifying a file. This ``__init__`` imports nothing."""
