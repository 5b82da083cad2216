"""`configserver check`: what would go wrong for some device, found before any device polls.

The folders are read the way the service reads them (one snapshot), then checked:

* every template file: syntax, and the includes, imports and extends that name no file;
* `{# configserver: ... #}` options and `# configserver: every poll above` markers;
* groups: a malformed table, models no innovaphone device has, templates for no group;
* template and vars files that no device will ever get or read, devices.csv rows naming no device;
* the revoked file: lines that revoke nothing;
* a folder that can answer no device, or only some;
* the template each device the folders name gets, rendered through the poll pipeline with that
  device's vars (a device named by its MAC alone as a device of each model it could be), and
  each model and group template rendered for a synthetic device of the model: undefined variables, missing includes, anything a template raises; URLs a device
  could not reach;
* scripts applied once whose applied part differs from one poll to the next (the device would
  apply it, and perhaps reset, on every poll), or that carry lines the wrap adds itself;
* `[firmware]` tables (configserver/firmware/).

Each problem names a file and line, so admins can run the check in their own CI.

    _findings.py   what the check knows and the problems it found
    _places.py     file names that no device will ever get or read
    _templates.py  template files: syntax, references, options, markers
    _vars.py       groups, vars files, devices.csv rows
    _revoked.py    the revoked file
    _devices.py    the devices the check renders for
    _rendering.py  rendering for each device, what the scripts say, and coverage
"""

from __future__ import annotations

from pathlib import Path

from ..firmware import check_firmware
from ..service import Service
from ..settings import Settings, environment_variable
from ._devices import devices
from ._findings import Findings, Problem
from ._rendering import check_coverage, check_rendering
from ._revoked import check_revoked
from ._templates import check_templates
from ._vars import check_groups, check_vars

__all__ = ["Problem", "check"]


def check(settings: Settings, config_file: Path | None = None) -> list[Problem]:
    """Check the templates and vars folders of `settings`; return the problems, sorted.

    `config_file` is named in problems with the `groups` setting. Files being written right now
    are read as they are: the check has no earlier version to fall back to.
    """
    if not Path(settings.templates).is_dir():
        where = environment_variable("templates") or (str(config_file) if config_file else "settings")
        return [Problem(where, 1, f"templates: {settings.templates} is not a folder (setting 'templates')")]
    # the revoked file is checked here, line by line, instead of stopping the check at the first
    service = Service.from_settings(settings.model_copy(update={"revoked": None}), grace_seconds=0)
    service.store.refresh()
    found = Findings(service.store, service.pipeline, settings, config_file)
    check_templates(found)
    check_groups(found)
    check_vars(found)
    check_revoked(found)
    check_coverage(found)
    check_rendering(found)
    for problem in check_firmware(found.snapshot, ((device, label) for device, label, _ in devices(found))):
        found.add(found.vars_file(problem.file), problem.line, problem.message, problem.device)
    return found.problems()
