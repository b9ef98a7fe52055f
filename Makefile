# Convenience targets; each works on a fresh machine (setup runs first where needed).
.PHONY: setup run test lint report clean

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/snakemake --cores 4

test: setup
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/snakefmt --check .
	.venv/bin/snakemake --lint

report: setup
	.venv/bin/snakemake --cores 4 --report report.html

clean:
	rm -rf results logs benchmarks .snakemake report.html
