"""lm-evaluation-harness tasks as objective and report, scored on the resident model."""
