"""Distributed plumbing: process groups, the DeepSpeed engine, and a multi-rank test helper."""
