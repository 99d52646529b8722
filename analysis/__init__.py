"""Analysis stages: header parsing into packed records, counting, and the anomaly detectors."""
