"""csaligner.encoders."""
