"""The compatibility module's guards: an aiosmtpd upgrade, or a Python one that
changes asyncio's StreamReader, is stopped at import or here, never in production.

What the copies do (DATA, addresses) is compared with upstream's own code in
tests/unit/test_data_reader.py; these tests only say when to compare again.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
from pathlib import Path

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from mta.inbound import aiosmtpd_compat, server


def source_hash(qualified_name: str) -> str:
    owner, name = qualified_name.split(".")
    assert owner == "SMTP"
    source = inspect.getsource(getattr(SMTP, name))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@pytest.mark.parametrize("function", sorted(aiosmtpd_compat.UPSTREAM_SOURCES))
def test_the_upstream_code_copied_or_relied_on_is_the_code_reviewed(function: str) -> None:
    assert source_hash(function) == aiosmtpd_compat.UPSTREAM_SOURCES[function], (
        f"aiosmtpd {aiosmtpd.__version__}'s {function} changed: compare it with the "
        f"version in aiosmtpd_compat.CHECKED_VERSIONS, carry any fix into "
        f"mta/inbound/aiosmtpd_compat.py, then update UPSTREAM_SOURCES"
    )


def test_another_aiosmtpd_version_is_refused_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiosmtpd, "__version__", "1.4.7")
    with pytest.raises(ImportError) as refused:
        aiosmtpd_compat._check_installed()
    assert str(refused.value) == (
        "aiosmtpd 1.4.7 is installed; mta was checked against aiosmtpd 1.4.6; "
        "pin aiosmtpd==1.4.6 or review mta/inbound/aiosmtpd_compat.py"
    )


@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (SMTP, "_timeout_cb", "SMTP._timeout_cb"),
        (SMTP, "_cb_client_connected", "SMTP._cb_client_connected, SMTP()._reader"),
        (asyncio.StreamReader, "_wait_for_data", "StreamReader._wait_for_data"),
    ],
)
def test_a_private_name_gone_is_refused_at_import(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, named: str
) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(ImportError, match="review mta/inbound/aiosmtpd_compat.py") as refused:
        aiosmtpd_compat._check_installed()
    assert f"lacks {named}" in str(refused.value)


def private_names(*classes: type) -> set[str]:
    """The single-underscore names ``classes`` define or use on their instances."""
    names: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__[:-1]:
            for value in vars(klass).values():
                code = getattr(inspect.unwrap(value), "__code__", None)
                names.update(code.co_names if code is not None else ())
            names.update(vars(klass))
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_the_session_module_uses_no_private_name_of_aiosmtpd_or_asyncio() -> None:
    tree = ast.parse(Path(server.__file__).read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    used |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    upstream = private_names(SMTP, asyncio.StreamReader)
    assert not used & upstream
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [module for module in modules if module and "._" in module]
