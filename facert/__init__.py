"""facert: edge inference runtime for Talk2Face-style unified sequence face models."""
