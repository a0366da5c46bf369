"""Vetted generation presets (text-generation-webui YAML) and the guard's policy."""
