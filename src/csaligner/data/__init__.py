"""csaligner.data."""
