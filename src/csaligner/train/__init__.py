"""csaligner.train."""
