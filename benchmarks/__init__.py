"""Side-by-side latency, memory and quality benchmarks (``cbart bench``)."""
