"""Benchmarks and reports. Every number the project claims comes from a command here."""
