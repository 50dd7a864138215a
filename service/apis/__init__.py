"""Every rule that belongs to one API (Openlayer, Humanloop): URLs, bodies, ids and config shapes."""
