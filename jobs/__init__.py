"""gemma-batch command line: run, validate, demo (and job submission stubs)."""
