# The two commands of the README. Both set up .venv first (see scripts/bootstrap.sh).
.PHONY: setup quickstart test test-fast bench continual-hf

setup:
	bash scripts/bootstrap.sh

quickstart: setup
	.venv/bin/moeforge run examples/quickstart.yaml

# The whole suite (what CI runs): under 15 minutes on a 2-core machine; the 30 slowest tests are
# listed at the end (docs/testing.md keeps the budget).
test: setup
	.venv/bin/python tests/run_suite.py --durations=30

# The inner loop: the tests that start no process, no subprocess and no Ray (under 3 minutes).
test-fast: setup
	.venv/bin/python -m pytest -q --fast --durations=10 tests

bench: setup
	.venv/bin/python bench/moe_layer.py

# An imported Hugging Face MoE: continual pretraining with replay -> distillation -> export (docs/hf.md).
continual-hf: setup
	.venv/bin/python scripts/make_tiny_hf_moe.py --family qwen3_moe --out runs/tiny-qwen3-moe
	.venv/bin/moeforge run examples/continual_hf.yaml
	.venv/bin/moeforge export runs/continual_hf --stage continual --to runs/continual_hf/hf/continual --overwrite
	.venv/bin/moeforge export runs/continual_hf --stage distill --to runs/continual_hf/hf/student --overwrite
	.venv/bin/python scripts/hf_generate.py runs/continual_hf/hf/continual runs/continual_hf/hf/student
