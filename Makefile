# The two set-up commands (see README): both install what they need first and are safe to rerun.
.PHONY: demo test test-slow setup setup-petsc

setup:
	bash deploy/setup.sh

setup-petsc:
	bash deploy/setup.sh --petsc

demo: setup
	.venv/bin/retrieval run deploy/configs/demo.toml

test: setup-petsc
	.venv/bin/python -m pytest

test-slow: setup-petsc
	.venv/bin/python -m pytest -m "slow or not slow"
