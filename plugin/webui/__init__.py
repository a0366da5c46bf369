"""The text-generation-webui extension (see docs/WEBUI.md)."""
