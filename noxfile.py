"""Developer sessions: ``nox -s tests lint typecheck`` (and ``browser`` for the Chromium test).

Interpreters nox cannot find are skipped, not failed, so ``nox -s tests`` works on a machine
that has only one of the supported Pythons; ``.ci/run`` puts every pyenv Python on PATH first.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.11", "3.12", "3.13"]
# Python sources only (ruff would otherwise also reformat code blocks inside docs/*.md).
LINTED = ["punie_trio", "tests", "benchmarks", "noxfile.py"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (browser tests excluded: see ``browser``)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not browser", *session.posargs)


@nox.session(python="3.11")
def browser(session: nox.Session) -> None:
    """Live reload in a real headless Chromium (needs /usr/bin/chromium)."""
    session.install("-e", ".[test,browser]")
    session.run("pytest", "-m", "browser", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff lint (with the ASYNC rules) and format check."""
    session.install("ruff>=0.17,<0.18")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[test]", "mypy>=2.4,<3")
    session.run("mypy")
