"""trimtab.backend: loading, converting, the model and generation."""
