"""csaligner.eval."""
