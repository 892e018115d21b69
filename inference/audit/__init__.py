"""Privacy audit: render the defaced face, try to detect and re-identify it, gate the series."""
