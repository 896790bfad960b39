# Two entry points, each self-bootstrapping on a fresh clone with Python 3.11:
#   make reproduce   run every notebook on the embedded toy world -> results/
#   make test        the whole test suite (unit tests + notebooks under nbval/papermill)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: reproduce test lab world seeds decoupled experts world-experts mcub cache

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

reproduce: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit reproduce --mode full --out results

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# JupyterLab on the notebooks, from the same self-bootstrapping .venv.
lab: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m jupyter lab notebooks

# Rebuild the toy world's trained checkpoints under data/world (44 min on one core).
world: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit build-world --out data/world --overwrite

# Stage-2 replicas of the world's LoRA models with training seeds 1 and 2 (13 min on one core).
seeds: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit build-seeds --world data/world --seeds 1 2 --overwrite

# DAMC's decoupled variant of every modality (text + modality LoRA) for training seeds 0, 1 and 2
# (18 min per seed on one core; resumes: models already built are kept).
decoupled: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit build-seeds --world data/world --variant decoupled --seeds 0 1 2

# The capability experts of the merging benchmark under data/experts (31 min on one core with the other busy).
experts: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit build-experts --out data/experts --overwrite

# The world and the experts together: the experts train in a second process once the world's base LM exists
# (each process on one thread: the weights `make world experts` writes on one thread; 74 min on a slow day).
world-experts: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit build-all --world data/world --experts data/experts --overwrite

# The MCUB files under data/mcub (seconds).
mcub: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit build-mcub --out data/mcub --overwrite

# The slow experiments' full-size results that the notebooks' default runs show, under data/results
# (about 7 min; resumes: what is stored for today's data is skipped).
cache: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mckit build-cache
