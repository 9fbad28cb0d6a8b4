"""Characters and their datasets: characters, projects, ingest, review, captions, reference sheets."""
