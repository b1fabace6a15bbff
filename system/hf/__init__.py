"""Hugging Face model families: config and tensor mapping, import streaming, export."""
