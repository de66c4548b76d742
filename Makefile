# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,mpi]'
	touch $@

# The main job on the default task: the `dates` seq2seq Transformer (human-written dates -> ISO 8601) trained by 2
# MPI workers on this machine, then a few of its translations. About a minute on 2 idle cores.
DEMO_RUN := runs/demo
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(BIN)/ndtrain train --task dates --model transformer --backend mpi --workers 2 --steps 1500 \
	    --set optim.schedule_kwargs.warmup_steps=100 --set run.eval_every=1500 --set run.eval_rows=500 \
	    --out $(DEMO_RUN)
	printf '%s\n' 'Wednesday, 3 March 2021' '14 jul 89' 'DECEMBER 25 1999' '07/04/76' 'Tue, Feb 29 2000' \
	    '1.1.2000' > $(DEMO_RUN)/demo_inputs.txt
	@echo "--- translations (input, then the model's greedy output):"
	@$(BIN)/ndtrain generate --run $(DEMO_RUN) --input $(DEMO_RUN)/demo_inputs.txt | paste $(DEMO_RUN)/demo_inputs.txt -
	@echo "--- run directory: $(DEMO_RUN) (metrics.jsonl, summary.json, checkpoints/, report.html)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/ndtrain bench engine

clean:
	rm -rf $(VENV) runs .pytest_cache
