"""YAML presets shipped as package data (`zoo:NAME`)."""
