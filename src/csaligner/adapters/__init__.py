"""csaligner.adapters."""
