# The two commands of the README. Both set up .venv first (see scripts/bootstrap.sh).
.PHONY: setup quickstart test bench

setup:
	bash scripts/bootstrap.sh

quickstart: setup
	.venv/bin/moeforge run examples/quickstart.yaml

test: setup
	.venv/bin/python -m pytest -q tests

bench: setup
	.venv/bin/python bench/moe_layer.py
