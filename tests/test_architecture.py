"""The package's shape: the import contract of pyproject.toml holds, and commands stay light."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contract_holds():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_help_starts_without_the_web_stack():
    probe = (
        "import sys, contextlib, io\n"
        "from configserver.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "heavy = sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'jinja2', 'sqlalchemy', 'prometheus_client')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_importing_the_package_loads_nothing_else():
    probe = "import sys, configserver; print(sorted(m for m in sys.modules if m.startswith('configserver')))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "['configserver']", result.stdout + result.stderr


def test_project_errors_share_one_root():
    from configserver.apply_once import OptionsError
    from configserver.certificates import CABundleError, CertificateError
    from configserver.content import ConfigurationError
    from configserver.errors import ConfigserverError
    from configserver.identity import InvalidDeviceName
    from configserver.inventory import InventoryError
    from configserver.lab import LabError
    from configserver.names import DNError
    from configserver.preview import UnresolvedDevice
    from configserver.refusals import Refused
    from configserver.settings import SettingsError
    from configserver.trust import TrustValueError

    for error in (CABundleError, CertificateError, ConfigurationError, InvalidDeviceName, InventoryError, LabError,
                  DNError, UnresolvedDevice, Refused, SettingsError, TrustValueError, OptionsError):
        assert issubclass(error, ConfigserverError), error


@pytest.mark.parametrize("script", sorted((ROOT / "bench").glob("*.py")), ids=lambda path: path.name)
def test_a_benchmark_loads_and_the_programs_it_writes_compile(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # benchmarks are run by hand, not by the suite: at least they load, and the programs they
    # write out and start (bench/terminator.py's constant answer) are valid Python
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)   # its dataclasses look themselves up there
    monkeypatch.setattr(sys, "path", list(sys.path))      # a benchmark puts its own folders first
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None))
    for name, value in vars(module).items():
        if name.isupper() and isinstance(value, str) and re.search(r"^(import|from) \w", value, re.MULTILINE):
            compile(value, f"{script.name}:{name}", "exec")   # a program it writes out (SERVE, CONSTANT_APP...)
