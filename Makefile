# The two quick-start commands: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test lint
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/xray2ct demo --out demo_out

test: setup
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check patching stage1_vqgan stage2_diffusion gan_baselines launch tests benchmarks
