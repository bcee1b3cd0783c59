"""``signbridge demo`` and what it is made of: the run itself (run.py), the component package it
builds (component.py) and the sample app's binaries (demo_app/, package data)."""
