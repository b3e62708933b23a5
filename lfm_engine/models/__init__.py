"""Real models lfm_engine uses as its built-in example (fetched once into a cache folder)."""
