"""effnet-tuner's search side: hypermodel, budgeted search, results, export (issues 3-5)."""
