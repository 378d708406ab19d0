"""Model loading and splitting."""
