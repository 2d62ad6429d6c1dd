"""csaligner.decode."""
