# make test   runs the test suite, nothing else.
# make bench  installs what the benchmark needs (the package with its test and celery
#             extras, nginx and redis-server when missing and apt-get is there), then
#             runs bench/run.py.
PYTHON ?= python

.PHONY: test bench

test:
	$(PYTHON) -m pytest

bench:
	$(PYTHON) -m pip install -q -e '.[test,celery]'
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
	  (command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -q nginx || (apt-get update -q && apt-get install -y -q nginx))) || \
	  echo "nginx could not be installed: the benchmark falls back to a Python receiver"
	@command -v redis-server >/dev/null 2>&1 || \
	  (command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server))) || \
	  echo "redis-server could not be installed: the Celery scenario is skipped"
	$(PYTHON) bench/run.py

# make mutation  runs tools/mutate.py: one-line mutants of the request and sending
#                modules against their fast tests, in a temporary copy (the working
#                tree is never modified). MUTATE_ARGS="-j 4 wsgi" passes options on.
.PHONY: mutation
mutation:
	$(PYTHON) tools/mutate.py $(MUTATE_ARGS)
