# make run   start the MTA on etc/mta.toml (creates .venv and dev keys on first use)
# make test  install what the tests need (Python and Debian packages), run them
# make lint  ruff and mypy
# make reliability-report [SOAK=1]  run tests/reliability, write docs/reliability.md

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests drive, each as a file it installs and the package:
# smtp-source/smtp-sink (postfix), swaks, nsd (the authoritative DNS server the
# delivery tests run), prometheus (promtool, and a real server that scrapes the
# daemon), systemd-analyze (checks the unit file) and libopendkim (OpenDKIM's
# verifier, loaded by the signing tests), redis-server (the fleet's shared
# limits), libfaketime (a wall clock the warmup tests move), unbound and
# ldnsutils (a validating resolver over zones signed for the DANE tests), curl
# (a client of the HTTP injection API). Under
# CI a test skipped for want of one fails (tests/conftest.py).
MULTIARCH := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('MULTIARCH'))")
DEBIAN_TOOLS := /usr/sbin/smtp-sink:postfix /usr/bin/swaks:swaks /usr/sbin/nsd:nsd \
	/usr/bin/promtool:prometheus /usr/bin/systemd-analyze:systemd \
	/usr/lib/$(MULTIARCH)/libopendkim.so.11:libopendkim11 /usr/bin/redis-server:redis-server \
	/usr/lib/$(MULTIARCH)/faketime/libfaketime.so.1:libfaketime /usr/sbin/unbound:unbound \
	/usr/bin/ldns-signzone:ldnsutils /usr/bin/ldns-keygen:ldnsutils /usr/bin/curl:curl

.PHONY: run test lint reliability-report clean

$(BIN)/mta: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/pytest: $(BIN)/mta
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

var/dkim/example.test.s2026.pem: | $(BIN)/mta
	$(BIN)/mta dkim keygen --domain example.test --selector s2026 --out var/dkim

var/tls/cert.pem:
	mkdir -p var/tls
	openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=mta.example.test" \
		-keyout var/tls/key.pem -out var/tls/cert.pem 2>/dev/null
	chmod 600 var/tls/key.pem

var/users:
	mkdir -p var && touch $@ && chmod 600 $@

run: $(BIN)/mta var/dkim/example.test.s2026.pem var/tls/cert.pem var/users
	$(BIN)/mta serve --config etc/mta.toml

debian-tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do \
		[ -e "$${pair%%:*}" ] || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian packages:$$missing"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "missing Debian packages:$$missing (tests that need them are skipped; install them as root)"; \
		fi; \
	fi

# The tests start `mta serve`, its workers and `mta ...` commands hundreds of
# times; with PYTHONDONTWRITEBYTECODE set (as in many CI images) each would
# compile mta's modules from source again (about 90 ms a start), so compile
# them once first (pip has compiled the installed packages).
test: $(BIN)/pytest debian-tools
	$(BIN)/python -m compileall -q mta
	$(BIN)/python -m pytest -q

reliability-report: $(BIN)/pytest debian-tools
	$(BIN)/python tools/reliability_report.py $(if $(SOAK),--soak)

lint: $(BIN)/pytest
	$(BIN)/ruff check mta tests tools
	$(BIN)/ruff format --check mta tests tools
	$(BIN)/mypy mta

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
