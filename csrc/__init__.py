"""Sources of trimtab's compiled engine; `trimtab.backend.ops` builds and loads them."""
